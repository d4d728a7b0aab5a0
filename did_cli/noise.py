"""The forward (noising) process of block diffusion and the mix of block sizes, as pure tensor functions.

* Loglinear schedule (BD3-LM's `LogLinearNoise`): a token is masked with probability t and its loss is weighted by
  1/t; t is drawn once per block, stratified (antithetic) over batch x blocks, and clipped to [eps_min, eps_max].
* Optional resampling of blocks whose masked fraction falls outside the clip interval (BD3-LM's
  `training.resample`), which lowers the variance of small-block training.
* Position 0 is never masked (BD3-LM's `ignore_bos`): it is the BOS of an unconditional sample, so training it as a
  prediction target would teach nothing the sampler uses.
* When the clip's lower end exceeds 0.5 the loss is unweighted (BD3-LM sets the loss scale to 1 there), see
  `is_unweighted`.
* The block-size mix of mix-scale fine-tuning (DiD): "4:0.9,1024:0.1" draws the block size per optimizer step from
  {4: 0.9, 1024: 0.1}; a size at least the sequence length means one global block, so a mix works at any length.

All randomness comes from an explicit `torch.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from did_cli.errors import UsageError

DEFAULT_EPS_MIN = 1e-3
DEFAULT_EPS_MAX = 1.0
# Above this lower clip end BD3-LM drops the 1/t weight (its `loss_scale = -1` branch).
UNWEIGHTED_ABOVE = 0.5


@dataclass(frozen=True)
class BlockSizeMix:
    """A distribution over block sizes, already resolved against a sequence length.

    Attributes:
        sizes: distinct block sizes, each dividing the length (the length itself = one global block).
        weights: probabilities, summing to one, in the order of `sizes`.
        spec: the string it was parsed from, for logs and provenance.
    """

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    spec: str

    def draw(self, generator: torch.Generator) -> int:
        """One block size; callers seed `generator` from (seed, step) so every data-parallel rank draws the same."""
        index = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), 1, generator=generator)
        return self.sizes[int(index)]


def parse_mix(spec: str, length: int) -> BlockSizeMix:
    """Parse "4:0.9,1024:0.1" (weights may be any positive numbers; they are normalised).

    Sizes at least `length` become `length`; sizes that map to the same block size have their weights added.

    Raises:
        UsageError: a malformed entry, a non-positive weight or size, or a size that does not divide the length.
    """
    merged: dict[int, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        size_text, sep, weight_text = part.partition(":")
        try:
            size = int(size_text)
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise UsageError(f"--mix entry {part!r} is not SIZE:WEIGHT (e.g. 4:0.9,1024:0.1)") from None
        if size < 1:
            raise UsageError(f"--mix block size must be positive, got {size}")
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise UsageError(f"--mix weight for block size {size} must be a positive number, got {weight_text}")
        size = min(size, length)
        if length % size:
            raise UsageError(f"--mix block size {size} does not divide the sequence length {length}")
        merged[size] = merged.get(size, 0.0) + weight
    if not merged:
        raise UsageError("--mix is empty; give at least one SIZE:WEIGHT")
    total = sum(merged.values())
    sizes = tuple(sorted(merged))
    return BlockSizeMix(sizes, tuple(merged[s] / total for s in sizes), spec)


Clip = tuple[float, float]
# Either one interval for every block size, or intervals per block size: BD3-LM tunes it per size (U[0.5, 1] for
# B = 4), and a mix must not squeeze its global block into a small block's interval.
ClipSpec = Clip | dict[int, Clip]
# `--clip auto`: search the interval per block size during training (training/clip_search.py).
AUTO_CLIP = "auto"


def is_unweighted(eps_min: float) -> bool:
    """Whether the loss drops the 1/t weight: BD3-LM does so when the clip's lower end exceeds 0.5."""
    return eps_min > UNWEIGHTED_ABOVE


def _parse_interval(text: str, spec: str) -> Clip:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--clip must be EPS_MIN,EPS_MAX or SIZE=EPS_MIN,EPS_MAX;..., got {spec!r}") from None
    if not 0.0 < low <= high <= 1.0:
        raise UsageError(f"--clip needs 0 < eps_min <= eps_max <= 1, got {spec!r}")
    return low, high


def parse_clip(spec: str) -> ClipSpec | str:
    """Parse "EPS_MIN,EPS_MAX" (every block size), "4=0.5,1;1024=0.001,1" (per block size) or "auto".

    Block sizes not listed in a per-size spec train on the full interval (1e-3, 1). "auto" is returned as is: the
    training loop searches the interval per block size (BD3-LM's `var_min`).
    """
    if spec.strip() == AUTO_CLIP:
        return AUTO_CLIP
    if "=" not in spec:
        return _parse_interval(spec, spec)
    per_size: dict[int, Clip] = {}
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        size_text, _, interval = part.partition("=")
        try:
            size = int(size_text)
        except ValueError:
            raise UsageError(f"--clip entry {part!r} is not SIZE=EPS_MIN,EPS_MAX") from None
        per_size[size] = _parse_interval(interval, spec)
    return per_size


def clip_for(clip: ClipSpec, block_size: int, length: int) -> Clip:
    """The interval for one block size; sizes at least the length mean the global block, as in the mix."""
    if isinstance(clip, tuple):
        return clip
    resolved = {min(size, length): interval for size, interval in clip.items()}
    return resolved.get(min(block_size, length), (DEFAULT_EPS_MIN, DEFAULT_EPS_MAX))


def sample_t(
    batch: int,
    num_blocks: int,
    generator: torch.Generator,
    eps_min: float = DEFAULT_EPS_MIN,
    eps_max: float = DEFAULT_EPS_MAX,
) -> torch.Tensor:
    """Noise level per block, stratified over batch x blocks (BD3-LM's antithetic sampling).

    Cell k of the B*nb cells draws from [k/(B*nb), (k+1)/(B*nb)), so every batch covers t evenly; this is what keeps
    the NELBO estimate's variance low.

    Returns:
        [B, nb] float32 in [eps_min, eps_max].
    """
    cells = batch * num_blocks
    uniform = torch.rand(batch, num_blocks, generator=generator)
    offset = torch.arange(cells, dtype=torch.float32).view(batch, num_blocks) / cells
    t = (uniform / cells + offset) % 1.0
    return t * (eps_max - eps_min) + eps_min


def mask_tokens(
    clean: torch.Tensor,
    t: torch.Tensor,
    block_size: int,
    mask_id: int,
    generator: torch.Generator,
    *,
    resample: bool = False,
    eps_min: float = DEFAULT_EPS_MIN,
    eps_max: float = DEFAULT_EPS_MAX,
    max_resamples: int = 100,
    keep_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t: each token masked independently with its block's probability t.

    With `resample`, blocks whose masked fraction lies outside the clip interval are redrawn (bounds at their
    defaults are not enforced, as in BD3-LM); unlike BD3-LM the redraw is capped so a narrow interval cannot loop
    forever. With `keep_first`, position 0 is put back clean after masking (and after resampling, whose masked
    fractions still count it), as BD3-LM's `ignore_bos` does.

    Args:
        clean: [B, L] int64 x_0 (on CPU; masks are drawn where the generator lives).
        t: [B, nb] per-block noise levels.
        block_size: B (L = nb * block_size).
        mask_id: the [MASK] id.
        generator: the randomness source.
        resample: redraw blocks outside [eps_min, eps_max].
        eps_min: lower clip bound.
        eps_max: upper clip bound.
        max_resamples: cap on redraw rounds.
        keep_first: never mask position 0.

    Returns:
        x_t [B, L] int64 and the per-token t [B, L] float32.
    """
    t_token = t.repeat_interleave(block_size, dim=-1)
    is_masked = torch.rand(clean.shape, generator=generator) < t_token
    if resample:
        for _ in range(max_resamples):
            fraction = is_masked.view(*t.shape, block_size).float().mean(-1)
            redo = torch.zeros_like(fraction, dtype=torch.bool)
            if eps_min != DEFAULT_EPS_MIN:
                redo |= fraction < eps_min
            if eps_max != DEFAULT_EPS_MAX:
                redo |= fraction > eps_max
            if not redo.any():
                break
            fresh = torch.rand(clean.shape, generator=generator) < t_token
            is_masked = torch.where(redo.repeat_interleave(block_size, dim=-1), fresh, is_masked)
    if keep_first:
        is_masked[..., 0] = False
    noisy = torch.where(is_masked, torch.full_like(clean, mask_id), clean)
    return noisy, t_token

"""The BD3-LM block-diffusion NELBO for one batch at one block size (training, validation, clip search, eval-nll).

loss = (1/N) * sum over masked positions of w(t) * -log p_theta(x_0 | x_t, x_0 of earlier blocks), with the SUBS
parameterisation: the [MASK] logit is removed and unmasked positions contribute nothing (the denoiser copies them).
w(t) = 1/t, or 1 when the clip's lower end exceeds 0.5 (BD3-LM's unweighted branch). Position 0 is never masked
(BD3-LM's `ignore_bos`). N is what BD3-LM divides by: every token (L per row) in training, every token but position
0 (L - 1 per row) in validation. Only masked positions go through the vocabulary projection, which saves about half
of its cost at no change in the value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from did_cli.model import BD3LM
from did_cli.noise import DEFAULT_EPS_MAX, DEFAULT_EPS_MIN, Clip, mask_tokens, sample_t


def nelbo_terms(
    model: BD3LM,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    t: torch.Tensor,
    block_size: int,
    *,
    weighted: bool = True,
    scored: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted per-token NELBO terms: w(t) * -log p_theta(x_0) at masked positions, zero elsewhere.

    Args:
        model: the denoiser.
        clean: [B, L] int64 x_0.
        noisy: [B, L] int64 x_t.
        t: [B, L] float per-token noise level (its block's t).
        block_size: B.
        weighted: weight by 1/t (False: weight 1, BD3-LM's loss when eps_min > 0.5).
        scored: optional bool [B, L]; positions outside it (padding) get no term even when masked.

    Returns:
        [B, L] float32 (with grad when the model is in training).
    """
    is_masked = noisy == model.mask_id
    if scored is not None:
        is_masked = is_masked & scored
    terms = torch.zeros(clean.shape, dtype=torch.float32, device=clean.device)
    if not bool(is_masked.any()):
        # Keep the graph connected so every data-parallel rank still runs backward through the same parameters.
        return terms + sum(p.sum() for p in model.parameters()) * 0.0
    logits = model.forward_train(noisy, clean, block_size, select=is_masked).float()
    mask_column = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask_column[model.mask_id] = True
    logits = logits.masked_fill(mask_column, float("-inf"))
    nll = F.cross_entropy(logits, clean[is_masked], reduction="none")
    if weighted:
        nll = nll / t[is_masked].float()
    return terms.masked_scatter(is_masked, nll)


def nelbo_sum(
    model: BD3LM, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, block_size: int, *, weighted: bool = True
) -> torch.Tensor:
    """Sum over the batch of `nelbo_terms` (divide by the token count for the mean).

    Returns:
        A scalar float32 tensor (with grad when the model is in training).
    """
    return nelbo_terms(model, clean, noisy, t, block_size, weighted=weighted).sum()


def noise_batch(
    clean: torch.Tensor,
    block_size: int,
    mask_id: int,
    generator: torch.Generator,
    interval: Clip = (DEFAULT_EPS_MIN, DEFAULT_EPS_MAX),
    *,
    resample: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and per-token t for a batch, as BD3-LM draws them: t stratified over batch x blocks, position 0 clean.

    Args:
        clean: [B, L] int64 x_0 on the CPU (noise is drawn where the generator lives).
        block_size: B (at least L means one global block).
        mask_id: the [MASK] id.
        generator: the randomness source.
        interval: (eps_min, eps_max) clip for t.
        resample: redraw blocks whose masked fraction falls outside the interval.

    Returns:
        x_t [B, L] int64 and t [B, L] float32.
    """
    batch, length = clean.shape
    block = min(block_size, length)
    eps_min, eps_max = interval
    t = sample_t(batch, length // block, generator, eps_min, eps_max)
    return mask_tokens(
        clean, t, block, mask_id, generator, resample=resample, eps_min=eps_min, eps_max=eps_max, keep_first=True
    )


@torch.no_grad()
def terms_in_chunks(
    model: BD3LM,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    t: torch.Tensor,
    block_size: int,
    chunk_rows: int | None = None,
    *,
    weighted: bool = True,
) -> torch.Tensor:
    """`nelbo_terms` of a batch without gradients, at most `chunk_rows` rows per forward pass.

    Each row's terms depend only on that row (its noise is an input), so the chunk size bounds memory and never
    changes which terms come out: validation and the clip search pass the micro-batch size here.

    Args:
        model: the denoiser.
        clean: [N, L] int64 x_0 (any device).
        noisy: [N, L] int64 x_t.
        t: [N, L] float per-token noise level.
        block_size: B.
        chunk_rows: rows per forward pass (None: all N at once).
        weighted: weight by 1/t.

    Returns:
        [N, L] float32 on the CPU.
    """
    rows = clean.shape[0]
    step = rows if chunk_rows is None else max(1, chunk_rows)
    device = model.device
    chunks = []
    for first in range(0, rows, step):
        part = slice(first, first + step)
        terms = nelbo_terms(
            model, clean[part].to(device), noisy[part].to(device), t[part].to(device), block_size, weighted=weighted
        )
        chunks.append(terms.float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(clean.shape, dtype=torch.float32)


@torch.no_grad()
def validation_sum(
    model: BD3LM, clean: torch.Tensor, block_size: int, generator: torch.Generator, chunk_rows: int | None = None
) -> tuple[float, int]:
    """The NELBO (nats) summed over one validation batch and the tokens it covers, as BD3-LM validates.

    Noise is BD3-LM's (`noise_batch`: unclipped t ~ U[1e-3, 1] stratified over batch x blocks), drawn on the CPU from
    `generator` for the whole batch, so validation is reproducible, identical across devices and independent of
    `chunk_rows`. Position 0 is kept clean and not counted: the batch covers N * (L - 1) tokens, BD3-LM's validation
    divisor. Add sums and token counts over batches and divide once for the token-weighted mean (BD3-LM's
    `MeanMetric` over per-token NLLs; `did eval-nll` does the same).

    Args:
        model: the denoiser.
        clean: [N, L] int64 x_0.
        block_size: B (at least L: one global block).
        generator: the batch's noise source.
        chunk_rows: rows per forward pass (memory only; see `terms_in_chunks`).

    Returns:
        (summed NELBO terms in nats as a float64 sum, N * (L - 1)).
    """
    batch, length = clean.shape
    noisy, t = noise_batch(clean.cpu(), block_size, model.mask_id, generator)
    terms = terms_in_chunks(model, clean, noisy, t, min(block_size, length), chunk_rows)
    return float(terms.double().sum()), batch * (length - 1)


@torch.no_grad()
def validation_nelbo(model: BD3LM, clean: torch.Tensor, block_size: int, generator: torch.Generator) -> float:
    """Mean per-token NELBO (nats) of one batch: `validation_sum` divided by its token count, B * (L - 1)."""
    total, tokens = validation_sum(model, clean, block_size, generator)
    return total / tokens

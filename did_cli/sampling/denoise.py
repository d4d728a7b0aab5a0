"""Block-by-block denoising of masked positions: the loop shared by drafting and refinement.

Blocks of size B are processed left to right. A block with no masked position is only appended to the KV cache
(consecutive clean blocks in one call); a block with masked positions is denoised call by call against the cache,
then appended once it is clean. Without a cache, every call recomputes the whole prefix: that slow path is kept
as the oracle the cached path must equal token for token.

Speed: which positions each call commits is decided on the CPU from per-position random keys drawn up front
(first-hitting and fixed-step orders need no model output for that), so the loop never waits on the device to
find out what to do next; positions travel to the device as small index tensors and results are written back with
scatters, never with boolean indexing (which forces a device sync). Only the committed rows reach the output layer.
The confidence order must look at the model's output and syncs once per call; with a confidence threshold it
commits every position the model is sure enough of, so its calls go where confidence is low.

A global block (B >= L) can reuse kept positions' keys and values between calls (`refine_cache` R > 1, see
`did_cli.sampling.reuse`); R = 1 is the exact pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from did_cli.kv_cache import KVCache
from did_cli.model import BD3LM
from did_cli.sampling.primitives import Snapshot, snapshot
from did_cli.sampling.reuse import KeptKVReuse
from did_cli.sampling.schedules import first_hitting_calls, fixed_step_calls, most_confident
from did_cli.settings import UnmaskingSettings

# on_call(tokens committed so far, tokens to commit in total); the CLI turns it into a progress bar.
CallCallback = Callable[[int, int], None]
# on_block_end(end, tokens [B, L]) after each denoised block: None, or a CPU bool [B] of rows to stop generating.
BlockEndHook = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@dataclass
class DenoiseResult:
    """Outcome of denoising a batch.

    Attributes:
        tokens: [B, L] int64, no [MASK] left.
        confidence: [B, L] float32, updated at every committed position.
        entropy: [B, L] float32 nats, the committing call's entropy at every committed position (input elsewhere).
        margin: [B, L] float32, the committing call's top-1 minus top-2 probability (input elsewhere).
        nfes: [B] int64 (CPU), model calls in which each sample committed at least one token.
        model_calls: batched denoiser calls made (each counts once however many samples it served).
        cache_calls: calls that only appended clean blocks to the KV cache (no logits; BD3-LM does not count them).
        commits: per sample, {tokens committed in one call: number of such calls} over the calls it took part in.
        full_calls: model calls that ran the whole sequence (all of them, unless `refine_cache` R > 1).
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    margin: torch.Tensor
    nfes: torch.Tensor
    model_calls: int
    cache_calls: int
    commits: list[dict[int, int]]
    full_calls: int


def denoise(
    model: BD3LM,
    tokens: torch.Tensor,
    is_masked: torch.Tensor,
    uniforms: torch.Tensor,
    confidence: torch.Tensor,
    *,
    block_size: int,
    settings: UnmaskingSettings,
    kv_cache: bool = True,
    on_call: CallCallback | None = None,
    on_block_end: BlockEndHook | None = None,
    vocab_size: int | None = None,
    refine_cache: int = 1,
    entropy: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> DenoiseResult:
    """Fill every masked position, block by block.

    Args:
        model: the denoiser.
        tokens: [B, L] int64 on the model's device; values at masked positions are ignored.
        is_masked: [B, L] bool, the positions to generate.
        uniforms: [B, L, 2] float64 (any device): a reveal key and a token-draw uniform per position.
        confidence: [B, L] float32; kept at unmasked positions, overwritten where tokens are committed.
        block_size: B (any value >= L means one global block).
        settings: unmasking order and token sampling.
        vocab_size: ids at or above it are never drawn (see `sample_from_logits`).
        refine_cache: R; above 1 (one global block only), kept positions' keys/values are recomputed every R calls.
        entropy: [B, L] float32 snapshot entropies of earlier stages, kept at unmasked positions (None: 0).
        margin: [B, L] float32 snapshot margins of earlier stages, kept at unmasked positions (None: 1).
        kv_cache: use the KV cache (True) or recompute the prefix at every call (the oracle).
        on_call: optional progress callback.
        on_block_end: optional hook called after each block that had masked positions, with the block's end and
            the tokens so far; rows it returns True for are stopped: their later masked positions are left as
            [MASK] and cost no model call of their own (variable-length sampling, early stop).

    Returns:
        A DenoiseResult; the inputs are not modified.

    Raises:
        ValueError: `refine_cache` above 1 with blocks smaller than the sequence.
    """
    batch, length = tokens.shape
    entropy = torch.zeros_like(confidence) if entropy is None else entropy
    margin = torch.ones_like(confidence) if margin is None else margin
    loop = _Loop(model, tokens, is_masked, uniforms, (confidence, entropy, margin), block_size, settings, on_call)
    loop.vocab_size = vocab_size
    if refine_cache > 1:
        if block_size < length:  # `RefineSettings` refuses this for users; a direct caller gets told too
            raise ValueError(f"refine_cache={refine_cache} needs one global block (block_size >= {length})")
        loop.reuse = KeptKVReuse(model, is_masked, refine_cache)
    cache = model.new_cache(batch, length) if kv_cache and block_size < length else None
    for start in range(0, length, block_size):
        end = min(start + block_size, length)
        if not loop.masked[:, start:end].any():
            continue
        if cache is not None and cache.length < start - block_size:
            # A run of clean blocks (a prompt, or blocks refinement left alone) goes into the cache in one call;
            # the last clean block is kept back to ride along with this block's first call.
            model.extend_cache(loop.tokens[:, cache.length : start - block_size], cache, block_size)
            loop.cache_calls += 1
        loop.denoise_block(start, end, cache)
        stop = on_block_end(end, loop.tokens) if on_block_end is not None else None
        if stop is not None:
            loop.masked[stop, end:] = False
    full_calls = loop.model_calls - (loop.reuse.calls - loop.reuse.full_calls if loop.reuse is not None else 0)
    commits = [dict(sorted(row.items())) for row in loop.commits]
    return DenoiseResult(
        loop.tokens,
        loop.confidence,
        loop.entropy,
        loop.margin,
        loop.nfes,
        loop.model_calls,
        loop.cache_calls,
        commits,
        full_calls,
    )


def _slots(commit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Committed positions per row as padded index tensors (CPU).

    Returns:
        gather [B, k] positions to read logits at (padding repeats a harmless position 0), scatter [B, k] positions to
        write at (padding points one past the block, a trash column), and counts [B].
    """
    counts = commit.sum(dim=1)
    k = int(counts.max())
    width = commit.shape[1]
    order = torch.sort((~commit).to(torch.int8), dim=1, stable=True).indices[:, :k]
    valid = torch.arange(k)[None, :] < counts[:, None]
    return torch.where(valid, order, 0), torch.where(valid, order, width), counts


class _Loop:
    """Mutable bookkeeping for one `denoise` call (kept out of the model and dropped when the call returns)."""

    def __init__(
        self,
        model: BD3LM,
        tokens: torch.Tensor,
        is_masked: torch.Tensor,
        uniforms: torch.Tensor,
        measures: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        block_size: int,
        settings: UnmaskingSettings,
        on_call: CallCallback | None,
    ) -> None:
        self.model, self.block_size, self.settings, self.on_call = model, block_size, settings, on_call
        self.device = tokens.device
        self.tokens = torch.where(is_masked, torch.full_like(tokens, model.mask_id), tokens)
        # Snapshot measures [B, L] float32, written where each token is committed (see `primitives.Snapshot`).
        self.confidence, self.entropy, self.margin = (values.clone() for values in measures)
        self.masked = is_masked.cpu().clone()
        self.keys, self.draws = uniforms[..., 0].cpu(), uniforms[..., 1].cpu()
        self.nfes = torch.zeros(tokens.shape[0], dtype=torch.long)
        self.model_calls = 0
        self.cache_calls = 0
        self.total = int(self.masked.sum())
        self.done = 0
        self.vocab_size: int | None = None
        self.reuse: KeptKVReuse | None = None
        self.commits: list[dict[int, int]] = [{} for _ in range(tokens.shape[0])]

    def denoise_block(self, start: int, end: int, cache: KVCache | None) -> None:
        masked = self.masked[:, start:end]
        if self.settings.order == "confidence":
            while masked.any():
                self._confidence_call(start, end, masked, cache)
            return
        if self.settings.order == "first-hitting":
            calls = first_hitting_calls(self.keys[:, start:end], masked, self.settings.tokens_per_call)
        else:
            calls = fixed_step_calls(self.keys[:, start:end], masked, int(self.settings.steps_per_block))
        for call in range(int(calls.max()) + 1):
            commit = calls == call
            if not commit.any():
                continue  # nothing is revealed at this step: the previous distribution stays valid, skip the call
            gather, scatter, counts = _slots(commit)
            self._write(start, end, scatter, self._sample(start, end, gather, cache))
            self._account(start, end, commit, counts)

    def _confidence_call(self, start: int, end: int, masked: torch.Tensor, cache: KVCache | None) -> None:
        gather, _, counts = _slots(masked)
        drawn = self._sample(start, end, gather, cache)
        confidence = drawn.confidence
        valid = torch.arange(gather.shape[1])[None, :] < counts[:, None]
        chosen = most_confident(confidence, valid.to(self.device), self.settings.tokens_per_call).cpu()
        threshold = self.settings.confidence_threshold
        if threshold is not None:
            # Every position above the threshold, and the most confident one whatever its probability.
            chosen |= (confidence.cpu() > threshold) & valid
        width = end - start
        scatter = torch.where(chosen, gather, width)
        commit = torch.zeros(masked.shape[0], width + 1, dtype=torch.bool)
        commit.scatter_(1, scatter, True)  # unchosen slots land in the trash column, never on a real position
        commit = commit[:, :width]
        self._write(start, end, scatter, drawn)
        self._account(start, end, commit, commit.sum(dim=1))

    def _sample(self, start: int, end: int, gather: torch.Tensor, cache: KVCache | None) -> Snapshot:
        """Tokens and snapshot measures [B, k] drawn at block positions `gather` [B, k] (CPU)."""
        self.model_calls += 1
        draws = self._to_device(self.draws[:, start:end].gather(1, gather))
        index = self._to_device(gather)
        if self.reuse is not None:
            logits = self.reuse(self.tokens, index)
        elif cache is not None:
            # The finished block before this one is appended to the cache by this same forward pass (block-causal
            # among the new tokens, so it sees exactly what a separate append would): one weight read saved per
            # block, which is what bounds a small-batch call.
            lag = start - cache.length
            tokens = self.tokens[:, cache.length : end]
            logits = self.model(tokens, self.block_size, cache=cache, select=index + lag, commit=lag)
        else:
            logits = self.model(self.tokens[:, :end], self.block_size, select=index + start)
        batch, k, vocab = logits.shape
        drawn = snapshot(
            logits.reshape(batch * k, vocab),
            draws.reshape(-1),
            mask_id=self.model.mask_id,
            top_p=self.settings.top_p,
            temperature=self.settings.temperature,
            vocab_size=self.vocab_size,
        )
        return Snapshot(*(values.view(batch, k) for values in drawn))

    def _write(self, start: int, end: int, scatter: torch.Tensor, drawn: Snapshot) -> None:
        # Scatter into the block plus one trash column, so padded slots never collide with real positions.
        index = self._to_device(scatter)
        targets = (self.tokens, self.confidence, self.entropy, self.margin)
        for target, values in zip(targets, drawn, strict=True):
            block = target[:, start:end]
            extended = torch.cat((block, block[:, :1]), dim=1)
            extended.scatter_(1, index, values.to(extended.dtype))
            block.copy_(extended[:, :-1])

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        # A copy from pageable memory waits for the device to drain; from pinned memory it is queued like a kernel.
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _account(self, start: int, end: int, commit: torch.Tensor, counts: torch.Tensor) -> None:
        self.masked[:, start:end] &= ~commit
        self.nfes += counts > 0
        for row, count in enumerate(counts.tolist()):
            if count:
                self.commits[row][count] = self.commits[row].get(count, 0) + 1
        if self.on_call is not None:
            self.done += int(counts.sum())
            self.on_call(self.done, self.total)

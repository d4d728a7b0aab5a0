"""Block-by-block denoising of masked positions: the loop shared by drafting and refinement.

Blocks of size B are processed left to right. A block with no masked position is only appended to the KV cache
(consecutive clean blocks in one call); a block with masked positions is denoised call by call against the cache,
then appended once it is clean. Without a cache, every call recomputes the whole prefix: that slow path is kept
as the oracle the cached path must equal token for token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from did_cli.config import UnmaskingSettings
from did_cli.kv_cache import KVCache
from did_cli.model import BD3LM
from did_cli.sampling.primitives import sample_from_logits
from did_cli.sampling.schedules import first_hitting_calls, fixed_step_calls, most_confident

# on_call(tokens committed so far, tokens to commit in total); the CLI turns it into a progress bar.
CallCallback = Callable[[int, int], None]


@dataclass
class DenoiseResult:
    """Outcome of denoising a batch.

    Attributes:
        tokens: [B, L] int64, no [MASK] left.
        confidence: [B, L] float32, updated at every committed position.
        nfes: [B] int64, model calls in which each sample committed at least one token.
        model_calls: batched denoiser calls made (each counts once however many samples it served).
        cache_calls: calls that only appended clean blocks to the KV cache (no logits; BD3-LM does not count them).
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    nfes: torch.Tensor
    model_calls: int
    cache_calls: int


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
) -> DenoiseResult:
    """Fill every masked position, block by block.

    Args:
        model: the denoiser.
        tokens: [B, L] int64; values at masked positions are ignored.
        is_masked: [B, L] bool, the positions to generate.
        uniforms: [B, L, 2] float64: a reveal key and a token-draw uniform per position.
        confidence: [B, L] float32; kept at unmasked positions, overwritten where tokens are committed.
        block_size: B (any value >= L means one global block).
        settings: unmasking order and token sampling.
        kv_cache: use the KV cache (True) or recompute the prefix at every call (the oracle).
        on_call: optional progress callback.

    Returns:
        A DenoiseResult; the inputs are not modified.
    """
    batch, length = tokens.shape
    tokens = torch.where(is_masked, torch.full_like(tokens, model.mask_id), tokens)
    confidence = confidence.clone()
    is_masked = is_masked.clone()
    nfes = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    state = _LoopState(model, tokens, confidence, is_masked, nfes, block_size, settings, on_call)
    cache = model.new_cache(batch, length) if kv_cache and block_size < length else None
    for start in range(0, length, block_size):
        end = min(start + block_size, length)
        if not is_masked[:, start:end].any():
            continue
        if cache is not None and cache.length < start:
            model.extend_cache(tokens[:, cache.length : start], cache, block_size)
            state.cache_calls += 1
        state.denoise_block(start, end, uniforms[:, start:end], cache)
    return DenoiseResult(tokens, confidence, nfes, state.model_calls, state.cache_calls)


class _LoopState:
    """Mutable bookkeeping for one `denoise` call (kept out of the model and dropped when the call returns)."""

    def __init__(
        self,
        model: BD3LM,
        tokens: torch.Tensor,
        confidence: torch.Tensor,
        is_masked: torch.Tensor,
        nfes: torch.Tensor,
        block_size: int,
        settings: UnmaskingSettings,
        on_call: CallCallback | None,
    ) -> None:
        self.model, self.tokens, self.confidence, self.is_masked, self.nfes = model, tokens, confidence, is_masked, nfes
        self.block_size, self.settings, self.on_call = block_size, settings, on_call
        self.model_calls = 0
        self.cache_calls = 0
        self.total = int(is_masked.sum())
        self.done = 0

    def denoise_block(self, start: int, end: int, uniforms: torch.Tensor, cache: KVCache | None) -> None:
        masked = self.is_masked[:, start:end]
        keys, draws = uniforms[..., 0], uniforms[..., 1]
        order = self.settings.order
        if order == "confidence":
            while masked.any():
                logits = self._logits(start, end, masked, cache)
                tokens, confidence = self._sample(logits, draws[masked])
                scores = torch.zeros(masked.shape, dtype=torch.float32, device=masked.device)
                scores[masked] = confidence
                commit = most_confident(scores, masked, self.settings.tokens_per_call)
                chosen = commit[masked]
                self._commit(start, end, commit, tokens[chosen], confidence[chosen])
            return
        if order == "first-hitting":
            calls = first_hitting_calls(keys, masked, self.settings.tokens_per_call)
        else:
            calls = fixed_step_calls(keys, masked, int(self.settings.steps_per_block))
        for call in range(int(calls.max()) + 1):
            commit = calls == call
            if not commit.any():
                continue  # nothing is revealed at this step: the previous distribution stays valid, skip the call
            logits = self._logits(start, end, commit, cache)
            tokens, confidence = self._sample(logits, draws[commit])
            self._commit(start, end, commit, tokens, confidence)

    def _logits(self, start: int, end: int, select: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        self.model_calls += 1
        if cache is not None:
            return self.model(self.tokens[:, start:end], self.block_size, cache=cache, select=select)
        select_all = torch.zeros(self.tokens.shape[0], end, dtype=torch.bool, device=select.device)
        select_all[:, start:end] = select
        return self.model(self.tokens[:, :end], self.block_size, select=select_all)

    def _sample(self, logits: torch.Tensor, draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_from_logits(
            logits,
            draws,
            mask_id=self.model.mask_id,
            top_p=self.settings.top_p,
            temperature=self.settings.temperature,
        )

    def _commit(
        self, start: int, end: int, commit: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor
    ) -> None:
        self.tokens[:, start:end][commit] = tokens
        self.confidence[:, start:end][commit] = confidence
        self.is_masked[:, start:end][commit] = False
        self.nfes += commit.any(dim=1)
        if self.on_call is not None:
            self.done += int(commit.sum())
            self.on_call(self.done, self.total)

"""Stage 1: semi-autoregressive drafting with a small block size B1 and the KV cache.

Every sample starts as its prompt (BOS alone when unconditional, as BD3-LM) followed by [MASK]s up to the length.
Blocks are denoised left to right; each token's snapshot confidence is recorded at the call that commits it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from did_cli.config import DraftSettings
from did_cli.errors import UsageError
from did_cli.model import BD3LM
from did_cli.sampling.denoise import CallCallback, denoise
from did_cli.sampling.primitives import draw_uniforms


@dataclass
class DraftResult:
    """A drafted batch.

    Attributes:
        tokens: [B, L] int64, prompt included.
        confidence: [B, L] float32 snapshot confidence; 1.0 at prompt positions.
        prompt_lengths: prompt tokens per sample (BOS included); these positions are never remasked.
        nfes: per-sample model calls that committed one of its tokens.
        model_calls: batched denoiser calls.
        cache_calls: KV-cache append calls (no logits).
        seconds: wall-clock for the batch.
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    prompt_lengths: list[int]
    nfes: list[int]
    model_calls: int
    cache_calls: int
    seconds: float


@torch.inference_mode()
def draft(
    model: BD3LM,
    prompts: list[list[int]],
    sample_ids: list[int],
    settings: DraftSettings,
    seed: int,
    on_call: CallCallback | None = None,
) -> DraftResult:
    """Draft one batch.

    Args:
        model: the denoiser.
        prompts: token ids per sample, each starting with BOS (at least one token, shorter than the length).
        sample_ids: global sample ids; sample i's randomness depends only on (seed, sample_ids[i]).
        settings: length, B1, cache use and unmasking.
        seed: the run's seed.
        on_call: optional progress callback.

    Returns:
        A DraftResult.
    """
    if len(prompts) != len(sample_ids):
        raise ValueError("one prompt per sample id is needed")
    length, device = settings.length, model.device
    if length > model.config.model_length:
        raise UsageError(f"--length {length} exceeds the model's length {model.config.model_length}")
    for prompt in prompts:
        if not 1 <= len(prompt) < length:
            raise UsageError(f"a prompt of {len(prompt)} tokens leaves nothing to generate within --length {length}")
    start = time.perf_counter()
    tokens = torch.full((len(prompts), length), model.mask_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    is_masked = torch.arange(length, device=device)[None, :] >= lengths[:, None]
    confidence = torch.where(is_masked, 0.0, 1.0).float()
    uniforms = draw_uniforms(seed, sample_ids, 0, length, 2)  # stays on the CPU, where positions are scheduled
    result = denoise(
        model,
        tokens,
        is_masked,
        uniforms,
        confidence,
        block_size=settings.block_size,
        settings=settings.unmasking,
        kv_cache=settings.kv_cache,
        on_call=on_call,
    )
    return DraftResult(
        tokens=result.tokens,
        confidence=result.confidence,
        prompt_lengths=[len(p) for p in prompts],
        nfes=result.nfes.tolist(),
        model_calls=result.model_calls,
        cache_calls=result.cache_calls,
        seconds=time.perf_counter() - start,
    )

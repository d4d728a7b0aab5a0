"""Stage k > 1: remask the least trusted gamma fraction of generated tokens and denoise them with block size B2.

With B2 = L (the default) the whole sequence is one bidirectional block: no KV cache, every call sees every kept
token. With B2 < L blocks are refined left to right, block-causally, with the KV cache over refined blocks, so the
paper's B2 sweep can be run. Only remasked positions can change; kept tokens keep their confidence. Prompt
positions and `pinned` ones (the generated EOS that ends a variable-length sample) are never remasked.

Cheaper refinement, both off by default: a confidence threshold commits several confident positions per call
(`UnmaskingSettings.confidence_threshold`), and `refine_cache` R > 1 recomputes kept positions' keys/values only
every R calls of the global block (`did_cli.sampling.reuse`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from did_cli.model import BD3LM
from did_cli.sampling.denoise import CallCallback, denoise
from did_cli.sampling.primitives import draw_uniforms
from did_cli.sampling.remask import SCORING_CALLS, STRATEGIES, RemaskInputs, select_lowest
from did_cli.settings import RefineSettings, check_block_size


@dataclass
class RefineResult:
    """A refined batch.

    Attributes:
        tokens: [B, L] int64.
        confidence: [B, L] float32; new values at re-committed positions, previous values elsewhere.
        entropy: [B, L] float32 snapshot entropy, likewise (0 where the input had none).
        margin: [B, L] float32 snapshot margin, likewise (1 where the input had none).
        remasked: [B, L] bool, the positions that were remasked (the only ones that may differ from the input).
        nfes: per-sample model calls, the strategy's scoring passes included (post-hoc: one; M for M passes).
        model_calls: batched denoiser calls, scoring passes counted as batched calls.
        cache_calls: KV-cache append calls.
        seconds: wall-clock for the batch.
        commits: per sample, {tokens committed in one call: calls} (the scoring pass is not a commit).
        full_calls: batched calls that ran the whole sequence (with `refine_cache` R > 1, one in R).
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    margin: torch.Tensor
    remasked: torch.Tensor
    nfes: list[int]
    model_calls: int
    cache_calls: int
    seconds: float
    commits: list[dict[int, int]]
    full_calls: int


@torch.inference_mode()
def refine(
    model: BD3LM,
    tokens: torch.Tensor,
    confidence: torch.Tensor,
    prompt_lengths: list[int],
    sample_ids: list[int],
    stage: int,
    settings: RefineSettings,
    seed: int,
    on_call: CallCallback | None = None,
    *,
    vocab_size: int | None = None,
    pinned: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> RefineResult:
    """Refine one batch.

    Args:
        model: the denoiser (the same mix-scale model that drafted).
        tokens: [B, L] int64 draft tokens.
        confidence: [B, L] float32 confidences from earlier stages.
        prompt_lengths: per sample, positions never remasked.
        sample_ids: global sample ids; randomness depends only on (seed, id, stage).
        stage: this stage's index (1 for the first refinement).
        settings: gamma, B2, remask strategy, unmasking.
        seed: the run's seed.
        on_call: optional progress callback.
        vocab_size: ids at or above it are never drawn (the tokenizer's size; see `sample_from_logits`).
        pinned: [B, L] bool, generated positions that are never remasked either: the EOS that ends a variable-length
            sample, so the refined sample still ends where its draft stopped. gamma applies to the other positions.
        entropy: [B, L] float32 snapshot entropies of earlier stages (None: records made before they were kept;
            `snapshot-entropy` then refuses them).
        margin: [B, L] float32 snapshot margins, likewise.

    Returns:
        A RefineResult; `remasked` is False wherever `pinned` is True.
    """
    start = time.perf_counter()
    batch, length = tokens.shape
    block_size = settings.block_size or length
    check_block_size(block_size, length)
    device = tokens.device
    lengths = torch.tensor(prompt_lengths, device=device)
    eligible = torch.arange(length, device=device)[None, :] >= lengths[:, None]
    if pinned is not None:
        eligible &= ~pinned.to(device)
    uniforms = draw_uniforms(seed, sample_ids, stage, length, 3)  # stays on the CPU, where positions are scheduled
    inputs = RemaskInputs(
        tokens=tokens,
        confidence=confidence,
        entropy=entropy,
        margin=margin,
        uniforms=uniforms[..., 2].to(device),
        model=model,
        block_size=block_size,
        sample_ids=sample_ids,
        stage=stage,
        seed=seed,
        passes=settings.passes,
        ensemble_ratio=settings.ensemble_ratio,
        eligible=eligible,
    )
    remasked = select_lowest(STRATEGIES[settings.remask](inputs), eligible, settings.gamma)
    result = denoise(
        model,
        tokens,
        remasked,
        uniforms[..., :2],
        confidence,
        block_size=block_size,
        settings=settings.unmasking,
        kv_cache=settings.kv_cache,
        on_call=on_call,
        vocab_size=vocab_size,
        refine_cache=settings.refine_cache,
        entropy=entropy,
        margin=margin,
    )
    scoring = SCORING_CALLS.get(settings.remask)
    scoring_calls = scoring(settings.passes) if scoring is not None else 0
    return RefineResult(
        tokens=result.tokens,
        confidence=result.confidence,
        entropy=result.entropy,
        margin=result.margin,
        remasked=remasked,
        nfes=(result.nfes + scoring_calls).tolist(),
        model_calls=result.model_calls + scoring_calls,
        cache_calls=result.cache_calls,
        seconds=time.perf_counter() - start,
        commits=result.commits,
        full_calls=result.full_calls + scoring_calls,
    )

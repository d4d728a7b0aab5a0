"""A revision stage that remasks nothing: committed tokens are replaced in place where the model now disagrees.

LLaDA 2.x revises committed tokens by editing: when the model predicts another token than the one committed, with a
probability above a threshold, the token is replaced (diffusers' block-refinement scheduler applies it inside each
block). Here the rule is applied globally to a finished draft, as a stage beside remasking (`EditSettings`): each of
R passes runs one bidirectional block over the clean sequence and reads the model's distribution at every generated
position; the candidate (the argmax, or a draw with the stage's top-p and temperature from the sample's own stream)
replaces the token when it differs from it and its probability exceeds the threshold. A replaced token's snapshot
measures become that pass's. Prompt positions and `pinned` ones (the EOS that ends a variable-length sample) never
change.

Each pass runs one sequence at a time, so which tokens change never depends on the batch (the denoiser is trained at
masked positions only: on a clean draft its distribution mostly reaffirms what is there, which is what the threshold
is for). Cost: R model calls per sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from did_cli.model import BD3LM
from did_cli.sampling.primitives import draw_uniforms, snapshot
from did_cli.settings import EditSettings


@dataclass
class EditResult:
    """An edited batch.

    Attributes:
        tokens: [B, L] int64.
        confidence: [B, L] float32; at edited positions the probability of the new token, previous values elsewhere.
        entropy: [B, L] float32 snapshot entropy, likewise.
        margin: [B, L] float32 snapshot margin, likewise.
        edited: [B, L] bool, the positions whose token changed (the only ones that may differ from the input).
        nfes: per-sample model calls (R).
        model_calls: passes, counted as batched calls.
        seconds: wall-clock for the batch.
    """

    tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    margin: torch.Tensor
    edited: torch.Tensor
    nfes: list[int]
    model_calls: int
    seconds: float


@torch.inference_mode()
def edit(
    model: BD3LM,
    tokens: torch.Tensor,
    confidence: torch.Tensor,
    prompt_lengths: list[int],
    sample_ids: list[int],
    stage: int,
    settings: EditSettings,
    seed: int,
    *,
    vocab_size: int | None = None,
    pinned: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
) -> EditResult:
    """Edit one batch.

    Args:
        model: the denoiser.
        tokens: [B, L] int64, finished records (no [MASK]).
        confidence: [B, L] float32 confidences from earlier stages.
        prompt_lengths: per sample, positions never edited.
        sample_ids: global sample ids; sampled candidates depend only on (seed, id, stage, pass).
        stage: this stage's index.
        settings: threshold, passes, candidate rule.
        seed: the run's seed.
        vocab_size: ids at or above it are never candidates (see `primitives.snapshot`).
        pinned: [B, L] bool, generated positions that never change either.
        entropy: [B, L] float32 earlier snapshot entropies (None: 0).
        margin: [B, L] float32 earlier snapshot margins (None: 1).

    Returns:
        An EditResult; with a threshold of 1 nothing changes.
    """
    start = time.perf_counter()
    batch, length = tokens.shape
    device = tokens.device
    lengths = torch.tensor(prompt_lengths, device=device)
    editable = torch.arange(length, device=device)[None, :] >= lengths[:, None]
    if pinned is not None:
        editable &= ~pinned.to(device)
    tokens, confidence = tokens.clone(), confidence.clone()
    entropy = torch.zeros_like(confidence) if entropy is None else entropy.clone()
    margin = torch.ones_like(confidence) if margin is None else margin.clone()
    edited = torch.zeros_like(editable)
    unmasking = settings.unmasking
    for step in range(settings.passes):
        uniforms = draw_uniforms(seed, sample_ids, stage, length, 1, purpose=f"edit:{step}")[..., 0]
        for row in range(batch):
            logits = model(tokens[row][None], block_size=length)[0]  # L, V: one bidirectional block
            drawn = snapshot(
                logits,
                uniforms[row].to(device),
                mask_id=model.mask_id,
                top_p=unmasking.top_p if settings.candidate == "sampled" else 1.0,
                temperature=unmasking.temperature if settings.candidate == "sampled" else 1e-30,
                vocab_size=vocab_size,
            )  # a vanishing temperature draws the argmax (see `primitives`): one rule for both candidates
            change = editable[row] & (drawn.tokens != tokens[row]) & (drawn.confidence > settings.threshold)
            for target, values in zip((tokens, confidence, entropy, margin), drawn, strict=True):
                target[row] = torch.where(change, values.to(target.dtype), target[row])
            edited[row] |= change
    return EditResult(
        tokens=tokens,
        confidence=confidence,
        entropy=entropy,
        margin=margin,
        edited=edited,
        nfes=[settings.passes] * batch,
        model_calls=settings.passes,
        seconds=time.perf_counter() - start,
    )

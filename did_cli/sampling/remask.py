"""Choosing the tokens a refinement stage remasks: snapshot, post-hoc or random scores, then the bottom gamma.

Every strategy maps a batch to one score per position (lower = less trusted) with the same signature, so they are
picked by name. The selection is pure: exactly round(gamma * n) of the n generated (non-prompt) positions, the
lowest scores first, ties broken by position (the earlier position is remasked first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from did_cli.model import BD3LM

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BD3LM, int], torch.Tensor]


def snapshot_scores(
    tokens: torch.Tensor, confidence: torch.Tensor, uniforms: torch.Tensor, model: BD3LM, block_size: int
) -> torch.Tensor:
    """The confidence recorded when each token was committed (the DiD paper's choice; no model call)."""
    return confidence.double()


@torch.inference_mode()
def posthoc_scores(
    tokens: torch.Tensor, confidence: torch.Tensor, uniforms: torch.Tensor, model: BD3LM, block_size: int
) -> torch.Tensor:
    """The probability of each existing token in one forward pass over the finished draft (the ablation baseline).

    The denoiser is only trained at masked positions, so on a clean draft it mostly reaffirms what is there; the
    paper reports this is worse than not refining at all. It costs one extra model call.
    """
    # One sequence at a time in fp32: full [B, L, V] float64 logits would take ~16 GB at B=16, L=1024, V=50k.
    scores = []
    for row in tokens:
        logits = model(row[None], block_size=block_size)[0].float()
        logits[:, model.mask_id] = float("-inf")
        log_probs = logits.gather(-1, row[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        scores.append(log_probs.double().exp())
    return torch.stack(scores)


def random_scores(
    tokens: torch.Tensor, confidence: torch.Tensor, uniforms: torch.Tensor, model: BD3LM, block_size: int
) -> torch.Tensor:
    """Uniform random scores from the samples' own streams (the second ablation baseline)."""
    return uniforms


# Keyed by `config.REMASK_STRATEGIES`, the one list of names (settings check names through `config.canonical_remask`).
STRATEGIES: dict[str, ScoreFn] = {"snapshot": snapshot_scores, "posthoc": posthoc_scores, "random": random_scores}


def remask_count(num_generated: torch.Tensor, gamma: float) -> torch.Tensor:
    """round(gamma * n) with halves rounded up (Python's round() would round half to even)."""
    return torch.floor(gamma * num_generated.double() + 0.5).long()


def select_lowest(scores: torch.Tensor, eligible: torch.Tensor, gamma: float) -> torch.Tensor:
    """The positions to remask: per row, the round(gamma * n) eligible positions with the lowest scores.

    Args:
        scores: [B, L] float, lower = remask first.
        eligible: [B, L] bool, the generated positions (prompt positions are never remasked).
        gamma: fraction in [0, 1].

    Returns:
        [B, L] bool with exactly round(gamma * eligible.sum(row)) True per row.
    """
    ranked = torch.where(eligible, scores.double(), torch.full_like(scores, float("inf"), dtype=torch.float64))
    order = torch.sort(ranked, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    count = remask_count(eligible.sum(dim=-1), gamma)
    return (rank < count[:, None]) & eligible

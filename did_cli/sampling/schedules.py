"""Which masked positions each model call commits.

First-hitting and fixed-step schedules decide positions without looking at the model: every masked token gets a
uniform reveal time (its "key"), which under the linear masking schedule is exactly the time it would be unmasked.
First-hitting commits positions in order of reveal time, `tokens_per_call` at a time (Zheng et al.'s equivalent of
the DDPM sampler, BD3-LM's default); `steps` bins reveal times into a fixed grid of calls. Deciding positions first
means the model only needs logits at the committed positions, which is why these are cheap.

Confidence order needs the model's output and is decided per call by `most_confident`.
"""

from __future__ import annotations

import torch


def first_hitting_calls(keys: torch.Tensor, is_masked: torch.Tensor, tokens_per_call: int = 1) -> torch.Tensor:
    """Call index at which each masked position is committed, revealing the largest key first.

    Args:
        keys: [B, n] float64 uniforms, one per position.
        is_masked: [B, n] bool, positions still to be decided.
        tokens_per_call: positions committed per call.

    Returns:
        [B, n] int64: call index for masked positions, -1 elsewhere.
    """
    masked_keys = torch.where(is_masked, keys, torch.full_like(keys, -1.0))
    order = torch.sort(masked_keys, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(keys.shape[-1], device=keys.device).expand_as(order))
    return torch.where(is_masked, rank // tokens_per_call, torch.full_like(rank, -1))


def fixed_step_calls(keys: torch.Tensor, is_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Call index for a `steps`-step DDPM-style schedule over one block.

    A token with reveal time tau is unmasked at step i when tau lies in [1 - (i+1)/steps, 1 - i/steps): the
    linear schedule's probability (t - s)/t of unmasking between t and s, drawn once per token up front.

    Returns:
        [B, n] int64 in [0, steps) for masked positions, -1 elsewhere.
    """
    step = ((1.0 - keys) * steps).floor().long().clamp_(0, steps - 1)
    return torch.where(is_masked, step, torch.full_like(step, -1))


def most_confident(confidence: torch.Tensor, is_candidate: torch.Tensor, tokens_per_call: int = 1) -> torch.Tensor:
    """The `tokens_per_call` candidate positions with the highest confidence per row; ties go to the lower position.

    Args:
        confidence: [B, n] float.
        is_candidate: [B, n] bool.
        tokens_per_call: how many to pick per row (fewer if a row has fewer candidates).

    Returns:
        [B, n] bool.
    """
    scores = torch.where(is_candidate, confidence.double(), torch.full_like(confidence, -1.0, dtype=torch.float64))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    pick = torch.zeros_like(is_candidate)
    pick.scatter_(-1, order[:, :tokens_per_call], True)
    return pick & is_candidate

"""`--clip auto`: the noise-clip interval per block size that minimises the variance of the training loss.

BD3-LM (`algo.var_min`) trains small blocks on a clipped schedule t ~ U[eps_min, eps_max] because the 1/t weight on
rarely masked blocks makes the gradient noisy. It does not fix the interval by hand: at every validation it estimates,
for each candidate interval, the variance of the per-block loss on the validation batches and trains on with the
lowest-variance one. This module holds that search:

* Candidates: (1e-3, 1) and, for each width w in 0.5, 0.6, ..., 0.9, the intervals [s, s + w] for s = 0, 0.05, ...,
  1 - w (lower ends below 1e-3 raised to 1e-3), BD3-LM's `clip_search_widths` and `clip_search_delta`.
* Per candidate and validation batch (`training.validation`'s batches of 16 held-out rows, whatever the micro-batch
  size or process count; noise from (seed, batch index, block size)): the NELBO terms under that interval (masks
  resampled into it, loss unweighted when eps_min > 0.5, as in training), averaged within each block, and their
  sample variance over the batch x blocks values; the variances are summed over batches. The smallest sum wins
  (ties: the earlier candidate).
* Block size 1 is not searched (BD3-LM's candidates there are the full interval and exact NLL).

The interval is kept per block size in the run (and its checkpoints, so a resumed run continues with it) and is
exported into the final config as `sampling_eps_min/max` and `did_training_clip`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from did_cli.model import BD3LM
from did_cli.noise import DEFAULT_EPS_MAX, DEFAULT_EPS_MIN, Clip, is_unweighted
from did_cli.training.objective import noise_batch, terms_in_chunks

DEFAULT_WIDTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_DELTA = 0.05


def clip_candidates(
    widths: Sequence[float] = DEFAULT_WIDTHS, delta: float = DEFAULT_DELTA, eps: float = DEFAULT_EPS_MIN
) -> list[Clip]:
    """The intervals the search compares, full interval first; bounds are rounded to 10 decimals (no float drift).

    Returns:
        Distinct (eps_min, eps_max) pairs in search order.
    """
    candidates: list[Clip] = [(eps, DEFAULT_EPS_MAX)]
    for width in widths:
        steps = int(round((1.0 - width) / delta))
        for k in range(steps + 1):
            start = round(k * delta, 10)
            interval = (max(start, eps), round(max(start + width, eps), 10))
            if interval not in candidates:
                candidates.append(interval)
    return candidates


@torch.no_grad()
def block_losses(
    model: BD3LM,
    clean: torch.Tensor,
    block_size: int,
    interval: Clip,
    generator: torch.Generator,
    resample: bool = True,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The loss of each block of a batch under one clip interval (what the search takes the variance of).

    Args:
        model: the denoiser (EMA weights during validation).
        clean: [B, L] int64 x_0.
        block_size: B (divides L).
        interval: (eps_min, eps_max).
        generator: noise source (CPU), drawn for the whole batch.
        resample: keep every block's masked fraction inside the interval, as training does.
        chunk_rows: rows per forward pass (memory only: the noise, and so the losses, do not depend on it).

    Returns:
        [B, L / block_size] float32: the mean NELBO term of each block (position 0 counts as a zero term).
    """
    batch, length = clean.shape
    noisy, t = noise_batch(clean.cpu(), block_size, model.mask_id, generator, interval, resample=resample)
    terms = terms_in_chunks(model, clean, noisy, t, block_size, chunk_rows, weighted=not is_unweighted(interval[0]))
    return terms.view(batch, length // block_size, block_size).mean(-1)


def summed_variance(per_batch: Iterable[torch.Tensor]) -> float:
    """Sum over batches of the sample variance of each batch's per-block losses (BD3-LM's search statistic).

    A batch with a single block loss has no sample variance; it adds 0 (torch would warn and return NaN).
    """
    return float(sum(float(losses.double().var()) if losses.numel() > 1 else 0.0 for losses in per_batch))


def search_clip(candidates: Sequence[Clip], losses_for: Callable[[Clip], Iterable[torch.Tensor]]) -> tuple[Clip, dict]:
    """The candidate whose per-block losses vary least.

    Args:
        candidates: intervals in search order (the first wins ties).
        losses_for: per candidate, the per-block losses [B, nb] of each validation batch.

    Returns:
        The chosen interval and {"min,max": summed variance} for every candidate (for the log).
    """
    best: Clip = candidates[0]
    best_variance = float("inf")
    table: dict[str, Any] = {}
    for interval in candidates:
        variance = summed_variance(losses_for(interval))
        table[f"{interval[0]:g},{interval[1]:g}"] = variance
        if variance < best_variance:
            best, best_variance = interval, variance
    return best, table


class ClipState:
    """The searched interval per block size, checkpointed with the run (accelerate's `register_for_checkpointing`)."""

    def __init__(self) -> None:
        self.intervals: dict[int, Clip] = {}

    def state_dict(self) -> dict[str, Any]:
        """The intervals as plain lists, keyed by block size."""
        return {"intervals": {str(size): list(interval) for size, interval in self.intervals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` wrote."""
        self.intervals = {int(size): (float(low), float(high)) for size, (low, high) in state["intervals"].items()}


__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_WIDTHS",
    "ClipState",
    "block_losses",
    "clip_candidates",
    "search_clip",
    "summed_variance",
]

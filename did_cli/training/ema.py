"""Exponential moving average of the weights, kept in fp32 and saved beside the optimizer state (`state.py`).

BD3-LM samples and validates with EMA weights and its released checkpoints are EMA weights, so `did` exports them
too. The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, as in BD3-LM; unlike BD3-LM, the average
starts from the loaded weights rather than from the random initialisation that loading overwrites.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class EMA:
    """fp32 shadow copies of a model's parameters (`shadow`, in parameter order) and the update count."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().float().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Move the average one step towards the current weights."""
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)
        for shadow, param in zip(self.shadow, parameters, strict=True):
            shadow.lerp_(param.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Overwrite `parameters` with the average."""
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow.to(param.dtype))

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """Run a block (validation, export) with the EMA weights, then put the training weights back."""
        params = list(model.parameters())
        backup = [p.detach().clone() for p in params]
        self.copy_to(params)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(params, backup, strict=True):
                    param.copy_(saved)

    def decay_at(self, update: int) -> float:
        """The decay applied by the `update`-th update (1-based): BD3-LM's warmup, capped at `decay`."""
        return min(self.decay, (1 + update) / (10 + update))

    def kept_fraction(self, updates: int) -> float:
        """The share of today's average that survives `updates` more updates: the product of their decays.

        Near 1 means the exported weights can barely move in that many steps. Computed in closed form (a few
        operations for any `updates`, so an absurd --steps cannot hang the run before it starts): while the warmup
        (1 + u) / (10 + u) is below `decay` the factors telescope, prod_{u=a}^{b} (u + 1) / (u + 10) =
        prod_{k=1}^{9} (a + k) / (b + 1 + k); from the first capped update on, each factor is `decay`.
        """
        if updates <= 0:
            return 1.0
        first, last = self.num_updates + 1, self.num_updates + updates
        capped_from = self._first_capped_update()
        kept = 1.0
        warm_last = min(last, capped_from - 1)
        if first <= warm_last:
            for k in range(1, 10):
                kept *= (first + k) / (warm_last + 1 + k)
        capped = last - max(first, capped_from) + 1
        if capped > 0:
            kept *= self.decay ** float(capped)  # a float power: decay ** 10**20 is 0.0 at once
        return kept

    def _first_capped_update(self) -> int:
        """The first update whose decay is `decay` itself rather than the warmup (1 + u) / (10 + u)."""
        # (1 + u) / (10 + u) >= decay  <=>  u >= (10 * decay - 1) / (1 - decay); checked against `decay_at`'s own
        # float comparison around that point, so the closed form and the per-update decays agree exactly.
        update = max(1, math.ceil((10 * self.decay - 1) / (1 - self.decay)) - 1)
        while self.decay_at(update) < self.decay:
            update += 1
        while update > 1 and self.decay_at(update - 1) == self.decay:
            update -= 1
        return update

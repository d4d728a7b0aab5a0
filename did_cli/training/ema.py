"""Exponential moving average of the weights, kept in fp32 and saved beside the optimizer state (`state.py`).

BD3-LM samples and validates with EMA weights and its released checkpoints are EMA weights, so `did` exports them
too. The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, as in BD3-LM; unlike BD3-LM, the average
starts from the loaded weights rather than from the random initialisation that loading overwrites.
"""

from __future__ import annotations

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

        Near 1 means the exported weights can barely move in that many steps.
        """
        kept = 1.0
        for update in range(self.num_updates + 1, self.num_updates + updates + 1):
            kept *= self.decay_at(update)
        return kept

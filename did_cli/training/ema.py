"""Exponential moving average of the weights, kept in fp32 and saved beside the optimizer state.

BD3-LM samples and validates with EMA weights and its released checkpoints are EMA weights, so `did` exports them
too. The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, as in BD3-LM; unlike BD3-LM, the average
starts from the loaded weights rather than from the random initialisation that loading overwrites.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class EMA:
    """fp32 shadow copies of a model's parameters; `state_dict`/`load_state_dict` make it checkpointable."""

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
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
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

    def state_dict(self) -> dict[str, Any]:
        """Decay, update count and shadow tensors."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` (tensors moved to where the current shadows live)."""
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = [s.to(current.device) for s, current in zip(state["shadow"], self.shadow, strict=True)]

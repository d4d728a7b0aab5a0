"""Approximate refinement of the global block: reuse kept positions' keys and values for R calls (`--refine-cache R`).

A refine call at B2 = L runs the whole sequence although only the remasked positions are asked for logits. The kept
(never remasked) positions' keys and values depend on the remasked tokens only through attention, so they drift
slowly while those tokens are filled in. `KeptKVReuse` runs a full pass every R calls and stores every layer's keys
and values; in between, only the remasked positions of each row run through the blocks, with their rotary phases at
their own positions, attending to the stored keys/values of kept positions and to their own fresh ones. A call then
costs about gamma * L tokens instead of L. R = 1 is never routed here: it is the exact pass itself.

It reuses the model's own modules (embedding, blocks, output layer) and the `KVCache.write` hook the blocks call, so
model.py is unchanged; the only assumption is that a block applies the rotary tables by broadcasting, which lets
each row carry its own positions ([B, 1, n, Dh] tables).

Shapes: B batch, L length, n remasked positions per row (padded to the batch's largest), k logits asked for.
"""

from __future__ import annotations

import torch

from did_cli.kv_cache import KVCache
from did_cli.model import BD3LM


class _ScatterCache(KVCache):
    """Keys and values of every position of the sequence, written in place at each new token's own position.

    `index` [B, n] names the positions of the tokens being run (padding points at the trash slot L); the blocks'
    `write` call puts their keys/values there and returns the whole sequence's, so queries attend to all L positions.
    """

    def __init__(self, model: BD3LM, batch: int, length: int) -> None:
        config = model.config
        super().__init__(
            num_layers=config.n_blocks,
            batch_size=batch,
            num_heads=config.n_heads,
            head_dim=config.head_dim,
            max_length=length + 1,  # one trash slot for padded positions
            dtype=model.dtype,
            device=model.device,
        )
        self.sequence_length = length
        self.index = torch.zeros(batch, 0, dtype=torch.long, device=model.device)

    def write(self, layer: int, new_keys: torch.Tensor, new_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter new keys/values [B, H, n, Dh] to `index` and return the sequence's [B, H, L, Dh]."""
        index = self.index[:, None, :, None].expand_as(new_keys)
        self.keys[layer].scatter_(2, index, new_keys)
        self.values[layer].scatter_(2, index, new_values)
        end = self.sequence_length
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class KeptKVReuse:
    """Logits for one global refine block, recomputing kept positions' keys/values only every `refresh_every` calls.

    Args:
        model: the denoiser.
        remasked: [B, L] bool (any device), the positions this stage denoises; the rest are kept.
        refresh_every: R >= 2; calls 0, R, 2R, ... run the full sequence, the others only the remasked positions.
    """

    def __init__(self, model: BD3LM, remasked: torch.Tensor, refresh_every: int) -> None:
        batch, length = remasked.shape
        self.model, self.refresh_every = model, refresh_every
        self.calls = 0
        self.full_calls = 0
        self.cache = _ScatterCache(model, batch, length)
        device = model.device
        remasked = remasked.cpu()
        counts = remasked.sum(dim=1)
        n = max(int(counts.max()), 1)
        order = torch.sort((~remasked).to(torch.int8), dim=1, stable=True).indices[:, :n]
        valid = torch.arange(n)[None, :] < counts[:, None]
        self.positions = torch.where(valid, order, 0).to(device)  # [B, n] rotary positions (padding: 0)
        self.active_index = torch.where(valid, order, length).to(device)  # [B, n] where keys/values go
        # slot[b, p]: where remasked position p of row b sits among the row's active positions.
        slot = torch.zeros(batch, length + 1, dtype=torch.long)
        slot.scatter_(1, torch.where(valid, order, length), torch.arange(n).expand(batch, n).contiguous())
        self.slot = slot[:, :length].to(device)
        self.full_index = torch.arange(length, device=device).expand(batch, length)

    def __call__(self, tokens: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """Raw logits [B, k, V] at positions `select` [B, k] (remasked positions) of `tokens` [B, L]."""
        refresh = self.calls % self.refresh_every == 0
        self.calls += 1
        if refresh:
            self.full_calls += 1
            hidden, cond = self._run(tokens, self.full_index)
            return self.model.logits(hidden, cond, select)
        hidden, cond = self._run(tokens.gather(1, self.positions), self.positions, self.active_index)
        return self.model.logits(hidden, cond, self.slot.gather(1, select))

    def _run(
        self, tokens: torch.Tensor, positions: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, n, D] of `tokens` [B, n] at per-row `positions` [B, n], keys/values written to `index`."""
        model = self.model
        self.cache.index = positions if index is None else index
        backbone = model.backbone
        cos, sin = backbone.rotary_emb(positions.reshape(-1))
        batch, n = positions.shape
        rotary = (cos.view(batch, 1, n, -1), sin.view(batch, 1, n, -1))
        cond = model._condition()
        x = backbone.vocab_embed(tokens)
        for layer, block in enumerate(backbone.blocks):
            x = block(x, cond, rotary, None, self.cache, layer)
        return x, cond

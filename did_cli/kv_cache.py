"""The KV cache for block-by-block decoding.

Keys and values of finished (clean) blocks are kept per layer in buffers allocated once for the whole sequence,
so appending a block is a copy into a slot, never a reallocation or a concatenation. Keys are stored after the
rotary embedding at their absolute positions; because the cache never slides (sequences are at most the model's
length), rotating once is exact and saves re-rotating the whole prefix at every call, which BD3-LM does.

Denoising calls write the current block into the slot just past `length` as scratch space and attend to the
prefix plus that slot through a view; only `commit` moves `length` forward. The cache is an explicit object the
sampler creates, passes to every model call and drops: no model module holds cache state.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated per-layer keys and values for a batch of sequences.

    Attributes:
        keys: [layers, B, H, max_length, D].
        values: [layers, B, H, max_length, D].
        length: number of committed positions (the prefix every later call sees).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_length(self) -> int:
        """Positions the cache can hold."""
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        """Sequences the cache holds."""
        return self.keys.shape[1]

    def write(self, layer: int, new_keys: torch.Tensor, new_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Place keys/values of new positions after the prefix and return views over prefix + new positions.

        The write is scratch until `commit`: the next write at the same `length` overwrites it.

        Args:
            layer: transformer block index.
            new_keys: [B, H, n, D], already rotated to absolute positions `length..length+n-1`.
            new_values: [B, H, n, D].

        Returns:
            Keys and values, each [B, H, length + n, D].
        """
        end = self.length + new_keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_length}")
        self.keys[layer, :, :, self.length : end] = new_keys
        self.values[layer, :, :, self.length : end] = new_values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def commit(self, num_positions: int) -> None:
        """Make the last written `num_positions` part of the prefix."""
        if self.length + num_positions > self.max_length:
            raise ValueError("cannot commit past the cache capacity")
        self.length += num_positions

    def reset(self) -> None:
        """Forget every committed position (the buffers are reused)."""
        self.length = 0

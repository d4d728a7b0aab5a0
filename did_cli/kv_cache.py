"""The KV cache for block-by-block decoding.

Keys and values of finished (clean) blocks are kept per layer in buffers allocated once for the whole sequence,
so appending a block is a copy into a slot, never a reallocation or a concatenation. Keys are stored after the
rotary embedding at their absolute positions; because the cache never slides (sequences are at most the model's
length), rotating once is exact and saves re-rotating the whole prefix at every call, which BD3-LM does.

Denoising calls write the current block into the slot just past `length` as scratch space and attend to the
prefix plus that slot through a view; only `commit` moves `length` forward. The cache is an explicit object the
sampler creates, passes to every model call and drops: no model module holds cache state.

The cache's dtype is normally the weights' dtype. A cache narrower than the activations (bf16 under fp32 weights,
`--kv-cache-dtype bfloat16`) selects BD3-LM's published CUDA numerics in the model's cached calls: q/k/v are rounded
to bf16 *before* the rotary embedding, rotary runs in bf16, attention runs in fp32 on the rounded values, and
everything else stays fp32. BD3-LM keeps the pre-rotary projections and re-rotates the whole prefix at each call;
rotary acts on each position alone, so rotating once at write time stores the very same bf16 keys.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from did_cli.errors import UsageError
from did_cli.settings import KV_CACHE_DTYPE_NAMES, check_kv_cache_dtype_name

KV_CACHE_DTYPES = {name: getattr(torch, name) for name in KV_CACHE_DTYPE_NAMES}


def check_kv_cache_dtype(cache_dtype: str | torch.dtype | None, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The cache dtype a model should use, or None for the weights' own dtype (did's default).

    Args:
        cache_dtype: None, `float32` or `bfloat16` (or the torch dtype).
        weights_dtype: the model's dtype.

    Raises:
        UsageError: an unknown name, or a float32 cache under bf16 weights (not a scheme did offers).
    """
    if cache_dtype is None:
        return None
    if isinstance(cache_dtype, str):
        check_kv_cache_dtype_name(cache_dtype)
        cache_dtype = KV_CACHE_DTYPES[cache_dtype]
    if cache_dtype not in KV_CACHE_DTYPES.values():
        raise UsageError(f"unsupported KV cache dtype {cache_dtype}; use float32 or bfloat16")
    if cache_dtype.itemsize > weights_dtype.itemsize:
        name = str(weights_dtype).removeprefix("torch.")
        raise UsageError(f"a float32 KV cache needs float32 weights (--dtype is {name}); use --dtype float32")
    return cache_dtype


class KVCache:
    """Preallocated per-layer keys and values for a batch of sequences.

    A cache says whether it runs the model's calls itself (`runs_calls`): this one does not, and the model writes
    through `write`; a static-shape cache (`did_cli.execution.StaticKVCache`) runs each call as a compiled or
    graph-captured step through `run`. The model asks the cache, so it never imports the execution machinery.

    Attributes:
        keys: [layers, B, H, max_length, D].
        values: [layers, B, H, max_length, D].
        length: number of committed positions (the prefix every later call sees).
    """

    runs_calls = False

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

    def run(self, model: Any, tokens: torch.Tensor, block_size: int, *, append: bool = False) -> Any:
        """Run a model call against the cache; only caches with `runs_calls` implement it."""
        raise NotImplementedError("this KV cache does not run calls; the model writes through `write`")


class CacheProvider(Protocol):
    """What hands a model its KV caches when calls run from reusable static-shape caches (`BD3LM.decoder`)."""

    def cache(self, batch_size: int, max_length: int, dtype: torch.dtype) -> KVCache:
        """A reset cache for this batch, capacity and dtype."""
        ...

"""Compiled and graph-captured execution of the denoiser: a static-shape KV cache and the decoding step that runs it.

A cached decoding call (a few new tokens against the KV cache) is cheap in FLOPs; on a GPU at small batch its time
goes to launching a few hundred kernels. Two remedies, each exact:

* `--compile`: `torch.compile` of the transformer blocks. Cache-free calls (refinement with one global block, the
  training form) compile `BD3LM.run_blocks` with static shapes; cached calls compile the static step below.
* `--cuda-graphs`: the cached decoding step captured once per (batch, new tokens, block size) into a CUDA graph and
  replayed per call: one launch instead of hundreds.

Both need a step whose tensor shapes do not change from call to call. `KVCache.write` returns views that grow with
the prefix, so every call would have a new key length. `StaticKVCache` instead writes the new keys/values at device
index tensors (`index_copy_`) and attends over the whole buffer, hiding positions past the new tokens with a mask
built on the device from those indices. The buffers are zero-initialised (masked keys must be finite: a NaN score
times a zero weight is still NaN). The only Python number that changes between calls is the cache length, used to
build the index tensor, so shapes are static per (batch, new tokens, block size): compiled once, no recompilation
per call. Attending over all L keys instead of the filled prefix costs a little extra attention arithmetic, which
is small next to the linear layers at the lengths BD3-LM uses.

The static decoder keeps its caches between sampling calls (a graph is bound to the buffers it was captured with),
one per (batch, length, dtype); at most one of them is in use at a time, as the sampler runs one stage at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from did_cli.errors import UsageError
from did_cli.kv_cache import KVCache
from did_cli.settings import check_attn_backend

if TYPE_CHECKING:
    from did_cli.config import ModelConfig
    from did_cli.model import BD3LM

# (tokens [B, n], positions [n]) -> (hidden [B, n, D], conditioning [1, C])
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _Slots:
    """What a transformer block sees as its cache inside a static step: buffers and the positions to write at."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys, self.values, self.positions = keys, values, positions

    def write(self, layer: int, new_keys: torch.Tensor, new_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, H, n, Dh] at `positions` of layer `layer`; return the whole buffers [B, H, L, Dh]."""
        self.keys[layer].index_copy_(2, self.positions, new_keys)
        self.values[layer].index_copy_(2, self.positions, new_values)
        return self.keys[layer], self.values[layer]


def static_mask(positions: torch.Tensor, max_length: int, block_size: int) -> torch.Tensor:
    """Block-causal mask of queries at `positions` over every slot of a cache of `max_length` positions.

    Args:
        positions: [n] int64 absolute query positions (consecutive).
        max_length: L, the cache capacity.
        block_size: B.

    Returns:
        Bool [n, L]: key j is visible to query i iff j // B <= positions[i] // B and j <= the last query position.
    """
    keys = torch.arange(max_length, device=positions.device)
    visible = (keys[None, :] // block_size) <= (positions[:, None] // block_size)
    return visible & (keys[None, :] <= positions[-1])


def static_step(
    model: BD3LM,
    keys: torch.Tensor,
    values: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached decoding call with static shapes: what is compiled and graph-captured.

    Args:
        model: the denoiser.
        keys: [layers, B, H, L, Dh] the cache's key buffer (written in place at `positions`).
        values: [layers, B, H, L, Dh] the value buffer.
        tokens: [B, n] the new tokens.
        positions: [n] int64 their absolute positions, on the device.
        block_size: B.

    Returns:
        Hidden states [B, n, D] and the conditioning vector [1, C].
    """
    mask = static_mask(positions, keys.shape[3], block_size)
    return model.run_blocks(tokens, positions, mask, _Slots(keys, values, positions))  # type: ignore[arg-type]


class _GraphStep:
    """A static step captured into a CUDA graph with static input buffers; each call copies inputs in and replays."""

    def __init__(self, step: StepFn, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        with torch.inference_mode(False):  # static buffers outlive the sampling call that creates them
            self.tokens, self.positions = tokens.clone(), positions.clone()
        # Warm-up on a side stream (allocator and cuBLAS workspaces), as torch.cuda.graphs prescribes. The warm-up
        # runs the real call: it writes the same keys/values the replay will write.
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(self.tokens, self.positions)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.hidden, self.cond = step(self.tokens, self.positions)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay on new inputs; the outputs are the graph's buffers, overwritten by the next call."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.hidden, self.cond


class StaticKVCache(KVCache):
    """A KV cache whose decoding calls have static shapes (see the module docstring).

    It keeps `KVCache`'s interface (`length`, `commit`, `reset`, the buffers) and says it runs calls (`runs_calls`):
    the model hands calls against it to `run` instead of writing through `KVCache.write`.
    """

    runs_calls = True

    def __init__(self, decoder: StaticDecoder, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keys.zero_()
        self.values.zero_()
        self.decoder = decoder

    def run(
        self, model: BD3LM, tokens: torch.Tensor, block_size: int, *, append: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run new tokens [B, n] at positions `length..length+n-1` against the cache (nothing is committed).

        Args:
            model: the denoiser.
            tokens: [B, n] new tokens.
            block_size: B.
            append: the call only appends clean tokens (a prompt): run it eagerly rather than compile or capture a
                step for a length that occurs once.

        Returns:
            Hidden states [B, n, D] and the conditioning vector [1, C].
        """
        n = tokens.shape[1]
        if self.length + n > self.max_length:
            raise ValueError(f"KV cache overflow: {self.length + n} positions > capacity {self.max_length}")
        positions = torch.arange(n, device=tokens.device) + self.length
        if append:
            return static_step(model, self.keys, self.values, tokens, positions, block_size)
        return self.decoder.step(self, tokens, positions, block_size)


class StaticDecoder:
    """Runs cached decoding calls through `static_step`, compiled (`compile`) and/or graph-captured (`cuda_graphs`).

    Attach it with `optimize`; `BD3LM.new_cache` then returns its caches.
    """

    def __init__(
        self, model: BD3LM, *, compile: bool = False, cuda_graphs: bool = False, backend: str = "inductor"
    ) -> None:
        self.model, self.compile, self.cuda_graphs = model, compile, cuda_graphs
        self._caches: dict[tuple[int, int, torch.dtype], StaticKVCache] = {}
        self._graphs: dict[tuple[int, int, int, int], _GraphStep] = {}
        self._compiled = torch.compile(static_step, dynamic=False, backend=backend) if compile else static_step

    def cache(self, batch_size: int, max_length: int, dtype: torch.dtype) -> StaticKVCache:
        """The (reused, reset) static cache for this batch, capacity and dtype."""
        key = (batch_size, max_length, dtype)
        if key not in self._caches:
            config = self.model.config
            # Normal tensors even when a sampler in inference mode asks first: later calls may run outside it.
            with torch.inference_mode(False):
                self._caches[key] = self._new_cache(config, batch_size, max_length, dtype)
        cache = self._caches[key]
        cache.reset()
        return cache

    def _new_cache(self, config: ModelConfig, batch_size: int, max_length: int, dtype: torch.dtype) -> StaticKVCache:
        return StaticKVCache(
            self,
            num_layers=config.n_blocks,
            batch_size=batch_size,
            num_heads=config.n_heads,
            head_dim=config.head_dim,
            max_length=max_length,
            dtype=dtype,
            device=self.model.device,
        )

    def step(
        self, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding call against `cache`: compiled, replayed from a graph, or eager."""

        def run(tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._compiled(self.model, cache.keys, cache.values, tokens, positions, block_size)

        if not self.cuda_graphs:
            return run(tokens, positions)
        key = (id(cache), tokens.shape[0], tokens.shape[1], block_size)
        if key not in self._graphs:
            self._graphs[key] = _GraphStep(run, tokens, positions)  # capturing records the call without running it
        return self._graphs[key](tokens, positions)


def optimize(
    model: BD3LM,
    *,
    attn_backend: str = "auto",
    compile: bool = False,
    cuda_graphs: bool = False,
    gradient_checkpointing: bool = False,
    compile_backend: str = "inductor",
) -> BD3LM:
    """Choose how `model` executes; none of these choices changes what it computes.

    Args:
        model: the denoiser (changed in place and returned).
        attn_backend: auto (flex on CUDA, SDPA elsewhere), sdpa or flex.
        compile: `torch.compile` the transformer blocks (static shapes per block size) and the cached decoding step.
        cuda_graphs: capture the cached decoding step into CUDA graphs (CUDA only).
        gradient_checkpointing: recompute each block's activations in the backward pass (training memory).
        compile_backend: the `torch.compile` backend (inductor; aot_eager traces the same graphs without code
            generation, which tests use because inductor takes about half a minute per graph on a small CPU).

    Returns:
        The same model.
    """
    model.attn_backend = check_attn_backend(attn_backend)
    if cuda_graphs and model.device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device; the model is on {model.device.type}")
    model.gradient_checkpointing = gradient_checkpointing
    # dynamic=None is torch's automatic dynamic shapes: the first call compiles a static graph, and the first call of
    # another length recompiles once with that length symbolic. Cache-free calls vary in length (`--no-kv-cache`
    # drafting grows the prefix, variable-length records refine at their own lengths); with static graphs only,
    # dynamo stops compiling after 8 of them and runs the rest eagerly, with a warning on stderr.
    model.compiled_blocks = torch.compile(model.run_blocks, dynamic=None, backend=compile_backend) if compile else None
    model.decoder = None
    if compile or cuda_graphs:
        model.decoder = StaticDecoder(model, compile=compile, cuda_graphs=cuda_graphs, backend=compile_backend)
    return model

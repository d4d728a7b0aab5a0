"""The BD3-LM denoiser: a DiT over token ids that returns raw logits, computed exactly as BD3-LM does.

Design choices, each for compatibility or speed:

* Module and parameter names are BD3-LM's (`backbone.blocks.0.attn_qkv.weight`, ...), including the
  `sampling_eps_min/max` buffers (saved only when the config's `var_min` is true, as in BD3-LM), so a released
  `model.safetensors` loads strictly with no key surgery and a `did` checkpoint loads back into BD3-LM's own class.
* Pre-LN blocks with weight-only LayerNorm computed in fp32, fused qkv without bias, rotary embeddings (rotate-half,
  base 10000) on q and k only, GELU(tanh) MLP, adaLN shift/scale/gate from `silu(sigma_map(sigma))`. Released
  models are time-independent, so sigma is always zero; the adaLN weights still act through the constant vector.
* Every path (block-causal denoising at any block size, the 2L training form, KV-cached decoding) goes through one
  block implementation; they differ only in positions, mask and cache, which are arguments.
* Attention runs through SDPA or flex attention (`attn_backend`: auto = flex on CUDA); with a static-shape cache
  from `did_cli.execution` (`--compile`, `--cuda-graphs`), cached calls run a compiled or graph-captured step, and
  `compiled_blocks` replaces the blocks of cache-free calls. `gradient_checkpointing` recomputes each block's
  activations in the backward pass instead of storing them.
* A bf16 KV cache under fp32 weights (`kv_cache_dtype`, `--kv-cache-dtype bfloat16`) runs cached calls with BD3-LM's
  CUDA sampler numerics: q/k/v rounded to bf16 before rotary, rotary in bf16, attention in fp32 (see `kv_cache`).
* Logits are raw (BD3-LM's backbone output, before SUBS). Callers that need logits at a few positions pass
  `select`, because the vocabulary projection dominates the cost of a small-block or single-token call.

Shapes use B batch, n new tokens, L length, V vocab, H heads, D model width, Dh head width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from did_cli.attention import (
    AttentionMask,
    attend,
    block_causal_block_mask,
    block_causal_mask,
    block_diffusion_block_mask,
    block_diffusion_mask,
    use_flex,
)
from did_cli.config import ModelConfig
from did_cli.kv_cache import CacheProvider, KVCache


class LayerNorm(nn.Module):
    """Weight-only LayerNorm in fp32 (BD3-LM computes it outside autocast for stability)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise x [..., D] of any dtype; the result is fp32."""
        return F.layer_norm(x.float(), (x.shape[-1],)) * self.weight.float()


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half form.

    `inv_freq` is kept as a buffer only because BD3-LM's state dict has it; the frequencies are recomputed in fp32
    at every call, since casting the model to bf16 would round the buffer and shift phases by up to 0.45 rad at
    position 1023.
    """

    def __init__(self, head_dim: int, base: float = 10_000.0) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self._frequencies(torch.device("cpu")))

    def _frequencies(self, device: torch.device) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponent)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin tables [n, Dh] (fp32) for integer `positions` [n]."""
        freqs = torch.outer(positions.float(), self._frequencies(positions.device))
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding to x [B, H, n, Dh] in fp32 and return it in x's dtype."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def _rotate_rounded(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding to x [B, H, n, Dh] in x's own dtype, each product and the sum rounded to it.

    This is BD3-LM's rotary on its bf16 KV cache (fp32 tables cast to bf16, eager bf16 arithmetic).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal(256) embedding of sigma followed by a two-layer MLP (BD3-LM's `sigma_map`)."""

    def __init__(self, cond_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """Embed sigma [B] into the conditioning [B, C]."""
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        embedding = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
        weight = self.mlp[0].weight
        return self.mlp(embedding.to(weight.dtype))


class EmbeddingLayer(nn.Module):
    """Untied token embedding stored as a raw parameter named `embedding`, as in BD3-LM."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, n] → embeddings [B, n, D]."""
        return F.embedding(tokens, self.embedding)  # deterministic backward, unlike indexing (index_put_ accumulate)


class DDiTBlock(nn.Module):
    """One pre-LN transformer block with adaLN modulation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, hidden = config.hidden_dim, config.mlp_ratio * config.hidden_dim
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * dim)
        # adaLN-zero (DiT): every block starts as the identity, as BD3-LM initialises it.
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Hidden states x [B, n, D] → [B, n, D]; with a cache, the new keys/values are written after its prefix."""
        batch, n, dim = x.shape
        dtype = x.dtype
        modulation = self.adaLN_modulation(cond)[:, None].float()
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=2)

        h = _modulate(self.norm1(x), shift_msa, scale_msa).to(dtype)
        qkv = self.attn_qkv(h).view(batch, n, 3, self.n_heads, dim // self.n_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # each [B, H, n, Dh]
        q, k, v = _attention_inputs(q, k, v, rotary, cache, layer)
        attn = attend(q, k, v, mask).transpose(1, 2).reshape(batch, n, dim).to(dtype)
        x = (x + gate_msa * F.dropout(self.attn_out(attn), self.dropout, self.training)).to(dtype)

        h = _modulate(self.norm2(x), shift_mlp, scale_mlp).to(dtype)
        return (x + gate_mlp * F.dropout(self.mlp(h), self.dropout, self.training)).to(dtype)


def _attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    cache: KVCache | None,
    layer: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q/k [B, H, n, Dh] and, with a cache, write k/v and return q with keys/values over prefix + new.

    A cache in the activations' dtype stores keys rotated in fp32 (did's numerics). A narrower cache (bf16 under fp32
    weights) follows BD3-LM's CUDA sampler: q/k/v rounded to the cache dtype before rotary, rotary in that dtype,
    then all three back in the activations' dtype, so attention runs in fp32 on the rounded values.
    """
    cos, sin = rotary
    if cache is None or cache.keys.dtype.itemsize >= q.dtype.itemsize:
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is None:
            return q, k, v
        k, v = cache.write(layer, k.to(cache.keys.dtype), v.to(cache.values.dtype))
        return q.to(k.dtype), k, v
    dtype, low = q.dtype, cache.keys.dtype
    q, k = _rotate_rounded(q.to(low), cos, sin), _rotate_rounded(k.to(low), cos, sin)
    k, v = cache.write(layer, k, v.to(low))
    return q.to(dtype), k.to(dtype), v.to(dtype)


class DDitFinalLayer(nn.Module):
    """adaLN-modulated final norm and the vocabulary projection (with bias, untied)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_final = LayerNorm(config.hidden_dim)
        self.linear = nn.Linear(config.hidden_dim, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_dim)
        for p in (self.linear.weight, self.linear.bias, self.adaLN_modulation.weight, self.adaLN_modulation.bias):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] with cond [1, C] (shared by all rows) → logits [..., V]."""
        shift, scale = self.adaLN_modulation(cond).float().chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale).to(x.dtype))


class DITBackbone(nn.Module):
    """Embedding, sigma conditioning, rotary tables, blocks and output layer (BD3-LM's `backbone`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.head_dim)
        self.blocks = nn.ModuleList(DDiTBlock(config) for _ in range(config.n_blocks))
        self.output_layer = DDitFinalLayer(config)


class BD3LM(nn.Module):
    """The BD3-LM denoiser.

    Call it as `model(input_ids, block_size=B)` for block-causal denoising logits; `forward_train` is the
    x_t ⊕ x_0 training form; `forward(..., cache=...)` and `extend_cache` are incremental decoding.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = DITBackbone(config)
        # Metadata buffers kept for a strict 1:1 state dict with BD3-LM checkpoints; sampling never reads them.
        # BD3-LM registers them only when `var_min` is true, so otherwise they stay out of the state dict.
        self.register_buffer("sampling_eps_min", torch.tensor(config.sampling_eps_min), persistent=config.var_min)
        self.register_buffer("sampling_eps_max", torch.tensor(config.sampling_eps_max), persistent=config.var_min)
        # Execution choices, none of which changes the result (see `did_cli.execution.optimize`).
        self.attn_backend = "auto"
        self.gradient_checkpointing = False
        self.compiled_blocks: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
        # Where new caches come from when calls run from static-shape caches (`did_cli.execution.StaticDecoder`).
        self.decoder: CacheProvider | None = None
        # Dtype of new KV caches; None: the weights' dtype. bf16 under fp32 weights is BD3-LM's cache numerics.
        self.kv_cache_dtype: torch.dtype | None = None

    @property
    def mask_id(self) -> int:
        """The [MASK] token id."""
        return int(self.config.mask_id)

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.backbone.vocab_embed.embedding.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (the residual stream's dtype outside autocast)."""
        return self.backbone.vocab_embed.embedding.dtype

    def _condition(self) -> torch.Tensor:
        """The adaLN conditioning vector [1, C]: time-independent, so sigma is zero for every sample."""
        sigma = torch.zeros(1, device=self.device)
        return F.silu(self.backbone.sigma_map(sigma))

    def _run_blocks(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is None and self.compiled_blocks is not None:
            return self.compiled_blocks(tokens, positions, mask, None)
        return self.run_blocks(tokens, positions, mask, cache)

    def run_blocks(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and every transformer block, eagerly: hidden states [B, n, D] and the conditioning [1, C].

        Args:
            tokens: [B, n] token ids.
            positions: [n] int64 rotary positions (on the tokens' device).
            mask: what `attention.attend` accepts, over [n, keys].
            cache: optional KV cache the blocks write the new keys/values into.
        """
        cond = self._condition()
        rotary = self.backbone.rotary_emb(positions)
        x = self.backbone.vocab_embed(tokens)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.backbone.blocks):
            if recompute:
                # Non-reentrant checkpointing restores the RNG state, so dropout masks match the first pass.
                x = checkpoint(block, x, cond, rotary, mask, cache, layer, use_reentrant=False)
            else:
                x = block(x, cond, rotary, mask, cache, layer)
        return x, cond

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        block_size: int | None = None,
        *,
        cache: KVCache | None = None,
        commit: bool | int = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [B, n, D] and the conditioning vector, before the output layer.

        Args:
            input_ids: [B, n] token ids (masked positions hold `mask_id`).
            block_size: B; None or any size covering all positions means one bidirectional block.
            cache: optional KV cache; the tokens then sit at positions `cache.length..cache.length+n-1` and see the
                whole cached prefix.
            commit: with a cache, keep the new keys/values as part of the prefix: True for all n tokens, or the
                number of leading tokens to keep (clean blocks that were run together with the next noisy block).
        """
        n = input_ids.shape[1]
        offset = cache.length if cache is not None else 0
        size = block_size if block_size is not None else offset + n
        if cache is not None and cache.runs_calls:
            hidden, cond = cache.run(self, input_ids, size, append=commit is True or commit == n)
        else:
            positions = torch.arange(offset, offset + n, device=input_ids.device)
            mask = block_causal_mask(n, size, offset=offset, device=input_ids.device)
            if mask is not None and cache is None and use_flex(self.attn_backend, input_ids.device):
                mask = block_causal_block_mask(n, size, device=input_ids.device)
            hidden, cond = self._run_blocks(input_ids, positions, mask, cache)
        if cache is not None and commit:
            cache.commit(n if commit is True else int(commit))
        return hidden, cond

    def logits(self, hidden: torch.Tensor, cond: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits from hidden states [B, n, D] for all positions or only selected ones.

        Args:
            hidden: [B, n, D].
            cond: the conditioning vector.
            select: None (all positions → [B, n, V]), a bool mask [B, n] (→ [N, V], row-major; syncs the device to
                count N), or int64 positions [B, k] (→ [B, k, V]; no sync, what the sampler uses).
        """
        if select is not None:
            if select.dtype == torch.bool:
                hidden = hidden[select]
            else:
                hidden = hidden.gather(1, select[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.backbone.output_layer(hidden, cond)

    def forward(
        self,
        input_ids: torch.Tensor,
        block_size: int | None = None,
        *,
        cache: KVCache | None = None,
        select: torch.Tensor | None = None,
        commit: int = 0,
    ) -> torch.Tensor:
        """Block-causal denoising logits (BD3-LM's sample-mode forward, before the SUBS parameterisation).

        Args:
            input_ids: [B, n] token ids.
            block_size: B; None or any B >= the sequence means fully bidirectional (MDLM).
            cache: optional KV cache with the clean prefix; by default the call does not commit to it.
            commit: with a cache, how many leading (clean, block-aligned) tokens to append to the prefix, so a
                finished block and the next noisy block share one forward pass.
            select: optional bool mask [B, n] or int64 positions [B, k]; only those positions get logits.

        Returns:
            [B, n, V] raw logits; [N, V] (row-major) for a bool `select`, [B, k, V] for positions.
        """
        hidden, cond = self.hidden_states(input_ids, block_size, cache=cache, commit=commit)
        return self.logits(hidden, cond, select)

    def extend_cache(self, input_ids: torch.Tensor, cache: KVCache, block_size: int) -> None:
        """Append clean tokens [B, n] to the cache (block-causal among themselves); no output layer is run."""
        self.hidden_states(input_ids, block_size, cache=cache, commit=True)

    def forward_train(
        self, noisy: torch.Tensor, clean: torch.Tensor, block_size: int, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The training form: x_t ⊕ x_0 in one pass with the block-diffusion mask; returns logits of the x_t half.

        Both halves use rotary positions 0..L-1. With one block (block_size >= L) the x_t half attends to nothing in
        x_0, so only the x_t half is run: the result is identical and half the cost.

        Args:
            noisy: [B, L] x_t (masked positions hold `mask_id`).
            clean: [B, L] x_0.
            block_size: B.
            select: optional bool [B, L]; only those x_t positions get logits (the loss needs masked ones only).

        Returns:
            [B, L, V] raw logits for x_t, or [N, V] for the selected positions in row-major order.
        """
        length = noisy.shape[1]
        if block_size >= length:
            return self(noisy, block_size=None, select=select)
        positions = torch.arange(length, device=noisy.device).repeat(2)
        if use_flex(self.attn_backend, noisy.device):
            mask: AttentionMask = block_diffusion_block_mask(length, block_size, noisy.device)
        else:
            mask = block_diffusion_mask(length, block_size, noisy.device)
        hidden, cond = self._run_blocks(torch.cat((noisy, clean), dim=1), positions, mask, None)
        return self.logits(hidden[:, :length], cond, select)

    def new_cache(self, batch_size: int, max_length: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on this model's device (dtype: `kv_cache_dtype`, else the model's; or e.g. fp32).

        With a static decoder attached (`--compile`, `--cuda-graphs`), its reusable static-shape cache is returned.
        """
        dtype = dtype or self.kv_cache_dtype or self.dtype
        if self.decoder is not None:
            return self.decoder.cache(batch_size, max_length or self.config.model_length, dtype)
        return KVCache(
            num_layers=self.config.n_blocks,
            batch_size=batch_size,
            num_heads=self.config.n_heads,
            head_dim=self.config.head_dim,
            max_length=max_length or self.config.model_length,
            dtype=dtype,
            device=self.device,
        )

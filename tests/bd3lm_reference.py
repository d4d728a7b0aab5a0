"""An independent, literal re-implementation of BD3-LM's forward pass, used only as a test oracle.

It follows the upstream computation step by step (per-half qkv, rotate-half rotary on q and k with v untouched,
explicit softmax attention, adaLN with shift/scale/gate, weight-only fp32 LayerNorm) and reads the upstream state
dict key names directly, so a key mapping bug or a numerical shortcut in did's model cannot hide behind shared code.
Masks are built with Python loops from the written definitions. `bd3lm_var_length` states BD3-LM's variable-length
stop rule on plain lists, line by line from its sampler.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F


def naive_block_causal(n: int, block_size: int) -> torch.Tensor:
    mask = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            mask[q, k] = (k // block_size) <= (q // block_size)
    return mask


def naive_block_diffusion(length: int, block_size: int) -> torch.Tensor:
    size = 2 * length
    mask = torch.zeros(size, size, dtype=torch.bool)
    for q in range(size):
        for k in range(size):
            q_clean, k_clean = q >= length, k >= length
            qb, kb = (q % length) // block_size, (k % length) // block_size
            diagonal = qb == kb and q_clean == k_clean
            offset_causal = qb > kb and not q_clean and k_clean
            causal = qb >= kb and q_clean and k_clean
            mask[q, k] = diagonal or offset_causal or causal
    return mask


def _layer_norm(x, weight):
    return F.layer_norm(x.float(), [x.shape[-1]]) * weight[None, None, :]


def _rotary(positions, head_dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.einsum("i,j->ij", positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def reference_logits(state, n_heads, tokens, positions, mask, qkv_dtype=None):
    """BD3-LM logits for `tokens` [B, n] at rotary `positions` [n] with a bool `mask` [n, n] (True = attend).

    `qkv_dtype` (e.g. bfloat16) is BD3-LM's KV-cache path on CUDA: the qkv projection is stored in that dtype, rotary
    runs on the stored values with the fp32 tables cast to it, and attention runs in fp32 on the results.
    """
    s = {k.removeprefix("backbone."): v.float() for k, v in state.items()}
    x = s["vocab_embed.embedding"][tokens]
    batch, n, dim = x.shape
    head_dim = dim // n_heads
    # sigma_map(0): sinusoidal embedding of zero is [1]*128 ++ [0]*128.
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.zeros(batch)[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    h = F.linear(t_freq, s["sigma_map.mlp.0.weight"], s["sigma_map.mlp.0.bias"])
    h = F.linear(F.silu(h), s["sigma_map.mlp.2.weight"], s["sigma_map.mlp.2.bias"])
    c = F.silu(h)
    cos, sin = _rotary(positions, head_dim)
    num_blocks = len({k.split(".")[1] for k in s if k.startswith("blocks.")})
    for i in range(num_blocks):
        p = f"blocks.{i}."
        mod = F.linear(c, s[p + "adaLN_modulation.weight"], s[p + "adaLN_modulation.bias"])[:, None]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=2)
        x_skip = x
        h = _layer_norm(x, s[p + "norm1.weight"]) * (1 + scale_msa) + shift_msa
        qkv = F.linear(h, s[p + "attn_qkv.weight"]).view(batch, n, 3, n_heads, head_dim)
        if qkv_dtype is not None:
            qkv = qkv.to(qkv_dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, n, H, Dh]
        c_, s_ = cos.to(qkv.dtype)[None, :, None], sin.to(qkv.dtype)[None, :, None]
        q = (q * c_ + _rotate_half(q) * s_).float()
        k = (k * c_ + _rotate_half(k) * s_).float()
        v = v.float()
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~mask[None, None], float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, n, dim)
        x = x_skip + gate_msa * F.linear(attn, s[p + "attn_out.weight"])
        h = _layer_norm(x, s[p + "norm2.weight"]) * (1 + scale_mlp) + shift_mlp
        h = F.linear(h, s[p + "mlp.0.weight"], s[p + "mlp.0.bias"])
        h = F.linear(F.gelu(h, approximate="tanh"), s[p + "mlp.2.weight"], s[p + "mlp.2.bias"])
        x = x + gate_mlp * h
    mod = F.linear(c, s["output_layer.adaLN_modulation.weight"], s["output_layer.adaLN_modulation.bias"])[:, None]
    shift, scale = mod.chunk(2, dim=2)
    h = _layer_norm(x, s["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return F.linear(h, s["output_layer.linear.weight"], s["output_layer.linear.bias"])


def reference_sample_mode(state, n_heads, tokens, block_size):
    n = tokens.shape[1]
    return reference_logits(state, n_heads, tokens, torch.arange(n), naive_block_causal(n, block_size))


def reference_train_mode(state, n_heads, noisy, clean, block_size):
    length = noisy.shape[1]
    positions = torch.cat([torch.arange(length), torch.arange(length)])
    tokens = torch.cat([noisy, clean], dim=1)
    return reference_logits(state, n_heads, tokens, positions, naive_block_diffusion(length, block_size))[:, :length]


def unigram_entropy(tokens: list[int]) -> float:
    """`torch.special.entr` of the token frequencies, summed (nats): BD3-LM's `_compute_entropy` for one sample."""
    counts = Counter(tokens)
    return -sum(n / len(tokens) * math.log(n / len(tokens)) for n in counts.values())


def bd3lm_var_length(
    tokens: list[int], block_size: int, eos_id: int, window: int = 256, threshold: float = 4.0
) -> int | None:
    """The tokens BD3-LM keeps of one full draw with `sampling.var_length`, or None where it draws the sample again.

    Upstream at 1c3e8f4, batch 1, BOS = EOS at position 0. `_semi_ar_sampler` (diffusion.py 1044-1050), after the block
    ending at `end`: `if x_accum.shape[1] > 256` run `_check_stop_conds`; on a stop return None (a redraw) when
    `x.shape[-1] == 1` (x is the last block, so: at block size 1), else break with the cut sample.
    `_check_stop_conds` (1059-1090): entropy of the last 256 tokens below 4 stops; more than one EOS in x (BOS is
    one) stops and cuts after the second, the first generated one; low entropy then sets the cut to `end - 256`.
    A draw that never stops is kept whole. `threshold` 0 never stops on entropy (an entropy is never negative).
    """
    for end in range(block_size, len(tokens) + 1, block_size):
        if end <= window:
            continue
        x = tokens[:end]
        stop, cut = False, None
        entropy = unigram_entropy(x[-window:])
        if entropy < threshold:
            stop = True
        eos_positions = [i for i, token in enumerate(x) if token == eos_id]
        if len(eos_positions) > 1:
            stop, cut = True, min(eos_positions[1] + 1, end)
        if entropy < threshold:
            stop, cut = True, end - window
        if stop:
            return None if block_size == 1 else cut
    return len(tokens)

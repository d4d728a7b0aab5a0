"""Attention masks for block diffusion, and the one attention call every model path goes through.

Three mask shapes cover every use of the BD3-LM denoiser:

* block-causal over a sequence (sampling, refinement, post-hoc scoring): token q sees token k iff
  `k // B <= q // B`, i.e. bidirectional inside a block and causal across blocks. A block size at least the
  sequence length is one global block (MDLM), which needs no mask at all;
* the same rule for a run of new tokens appended after a KV cache (the cache holds earlier positions);
* the training form x_t ⊕ x_0 of length 2L (BD3-LM's `block_diff_mask`): the union of
  block-diagonal (M_BD, each half within its own block), offset block-causal (M_OBC, a noisy block sees strictly
  earlier clean blocks) and block-causal (M_BC, the clean half is block-causal).

Masks are boolean with True meaning "may attend", the convention of `scaled_dot_product_attention`. `None` means
"everything visible" and lets SDPA pick its fused kernels; returning `None` whenever it is exact is a speed
choice, not a convenience.

Two attention backends compute the same thing (`config.ATTN_BACKENDS`):

* `sdpa`: dense boolean masks through `scaled_dot_product_attention`; the CPU path and the oracle;
* `flex`: `torch.nn.attention.flex_attention` with a `BlockMask` that skips fully masked 128 x 128 tiles, as
  upstream BD3-LM trains. Each BlockMask is built once per (length, block size, offset, device) and cached. On CUDA
  the flex call is compiled into a fused kernel; on the CPU it runs torch's unfused reference implementation
  (the dense computation flex's kernels are tested against), which is slow but exact and differentiable.
  `auto` picks flex on CUDA and SDPA elsewhere.

Flex is used for cache-free calls only (the x_t ⊕ x_0 training form and block-causal calls over a whole
sequence); calls against a KV cache have a handful of queries, where a dense [n, m] mask costs nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# What `attend` accepts: a dense bool mask [n, m], a flex BlockMask, or None (everything visible).
AttentionMask = torch.Tensor | BlockMask | None


def block_causal_mask(
    num_queries: int, block_size: int, *, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """Block-causal mask for `num_queries` new tokens at positions `offset..offset+num_queries-1`.

    Keys are positions `0..offset+num_queries-1`: the cached prefix (if any) followed by the new tokens.

    Args:
        num_queries: number of new tokens (n).
        block_size: B; blocks are aligned to absolute positions (`pos // B`).
        offset: number of positions already held in a KV cache before the new tokens.
        device: where to build the mask.

    Returns:
        Bool [n, offset + n], or None when every query may see every key (all queries in one block).
    """
    first_block = offset // block_size
    last_block = (offset + num_queries - 1) // block_size
    if first_block == last_block:
        return None
    return _block_causal_mask_cached(num_queries, block_size, offset, torch.device(device))


@functools.lru_cache(maxsize=64)
def _block_causal_mask_cached(num_queries: int, block_size: int, offset: int, device: torch.device) -> torch.Tensor:
    query_block = torch.arange(offset, offset + num_queries, device=device) // block_size
    key_block = torch.arange(offset + num_queries, device=device) // block_size
    return key_block[None, :] <= query_block[:, None]


@functools.lru_cache(maxsize=16)
def block_diffusion_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The training mask over x_t ⊕ x_0 (BD3-LM's M_BD | M_OBC | M_BC).

    Args:
        length: L, the length of each half.
        block_size: B; a block size at least L gives one block, i.e. the MDLM denoiser on the x_t half.
        device: where to build the mask (cached per device, so a mix of block sizes builds each mask once).

    Returns:
        Bool [2L, 2L]; rows are queries, x_t first then x_0.
    """
    index = torch.arange(2 * length, device=torch.device(device))
    is_clean = index >= length
    block = (index % length) // block_size
    q_block, k_block = block[:, None], block[None, :]
    q_clean, k_clean = is_clean[:, None], is_clean[None, :]
    block_diagonal = (q_block == k_block) & (q_clean == k_clean)
    offset_block_causal = (q_block > k_block) & ~q_clean & k_clean
    block_causal = (q_block >= k_block) & q_clean & k_clean
    return block_diagonal | offset_block_causal | block_causal


def use_flex(choice: str, device: torch.device) -> bool:
    """Whether backend `choice` (auto, sdpa, flex) runs flex attention on `device` (auto: flex on CUDA only)."""
    return choice == "flex" or (choice == "auto" and device.type == "cuda")


def block_diffusion_block_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> BlockMask:
    """The training mask over x_t ⊕ x_0 as a flex BlockMask (same rule as `block_diffusion_mask`).

    Args:
        length: L, the length of each half.
        block_size: B.
        device: where the BlockMask's index tensors live (cached per device).

    Returns:
        A BlockMask of shape [2L, 2L] (broadcast over batch and heads).
    """
    return _block_mask(_block_diffusion_mod(length, block_size), 2 * length, 2 * length, torch.device(device))


def block_causal_block_mask(
    num_queries: int, block_size: int, *, offset: int = 0, device: torch.device | str = "cpu"
) -> BlockMask:
    """`block_causal_mask` (queries at `offset..offset+n-1`, keys `0..offset+n-1`) as a flex BlockMask."""
    mod = _block_causal_mod(block_size, offset)
    return _block_mask(mod, num_queries, offset + num_queries, torch.device(device))


# Mask functions are cached per parameter set so that masks of different lengths share one function object: a
# compiled flex kernel is specialised on the mask function, and a new object per length would recompile it.
@functools.lru_cache(maxsize=64)
def _block_diffusion_mod(length: int, block_size: int) -> Callable[..., torch.Tensor]:
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q_clean, k_clean = q >= length, kv >= length
        q_block = torch.where(q_clean, q - length, q) // block_size
        k_block = torch.where(k_clean, kv - length, kv) // block_size
        block_diagonal = (q_block == k_block) & (q_clean == k_clean)
        offset_block_causal = (q_block > k_block) & ~q_clean & k_clean
        block_causal = (q_block >= k_block) & q_clean & k_clean
        return block_diagonal | offset_block_causal | block_causal

    return mask_mod


@functools.lru_cache(maxsize=64)
def _block_causal_mod(block_size: int, offset: int) -> Callable[..., torch.Tensor]:
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return kv // block_size <= (q + offset) // block_size

    return mask_mod


@functools.lru_cache(maxsize=128)
def _block_mask(mask_mod: Callable[..., torch.Tensor], queries: int, keys: int, device: torch.device) -> BlockMask:
    return create_block_mask(mask_mod, None, None, queries, keys, device=device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention under a dense mask (SDPA) or a BlockMask (flex attention).

    Args:
        q: [B, H, n, D] queries.
        k: [B, H, m, D] keys (m >= n when a cache precedes the queries).
        v: [B, H, m, D] values.
        mask: bool [n, m] (True = may attend), a BlockMask over [n, m], or None for full attention.

    Returns:
        [B, H, n, D].
    """
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    # Compiled once per process and cached by dynamo per mask function. Automatic dynamic shapes: a training run
    # sees one shape per block size, but uncached sampling calls grow by a block per call, and a static kernel per
    # length would recompile until dynamo's recompile limit.
    return torch.compile(flex_attention)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)  # traced into the caller's compiled graph
    if q.device.type == "cuda" and q.shape[-1] >= 16:  # the fused kernels need a head width of at least 16
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    return _flex_reference(q, k, v, block_mask)


def _flex_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """Flex attention through torch's unfused reference implementation (the higher-order op run eagerly).

    Written by hand because the public `flex_attention` refuses inputs that need gradients on the CPU, although the
    operator it dispatches to supports them; this keeps CPU training and the gradient tests on the flex path.
    """
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op

    options = {
        "BACKEND": "AUTO",
        "PRESCALE_QK": False,
        "ROWS_GUARANTEED_SAFE": False,
        "BLOCKS_ARE_CONTIGUOUS": False,
        "WRITE_DQ": True,
        "OUTPUT_LOGSUMEXP": False,
        "OUTPUT_MAX": False,
    }
    out, *_ = flex_attention_op(q, k, v, _identity_score, block_mask.as_tuple(), 1.0 / math.sqrt(q.shape[-1]), options)
    return out


def _identity_score(
    score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
) -> torch.Tensor:
    return score

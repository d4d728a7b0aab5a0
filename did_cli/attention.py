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
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention.

    Args:
        q: [B, H, n, D] queries.
        k: [B, H, m, D] keys (m >= n when a cache precedes the queries).
        v: [B, H, m, D] values.
        mask: bool [n, m] (True = may attend) or None for full attention.

    Returns:
        [B, H, n, D].
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

import pytest
import torch

from did_cli.attention import (
    attend,
    block_causal_block_mask,
    block_causal_mask,
    block_diffusion_block_mask,
    block_diffusion_mask,
    use_flex,
)
from did_cli.errors import UsageError
from did_cli.settings import check_attn_backend
from tests.bd3lm_reference import naive_block_causal, naive_block_diffusion


@pytest.mark.parametrize("length,block_size", [(8, 2), (12, 4), (16, 1), (16, 16), (12, 3)])
def test_block_diffusion_mask_matches_naive_definition(length, block_size):
    assert torch.equal(block_diffusion_mask(length, block_size), naive_block_diffusion(length, block_size))


def test_block_diffusion_mask_example_from_bd3lm_notes():
    rows = [
        "11000000 00000000",
        "00110000 11000000",
        "00001100 11110000",
        "00000011 11111100",
        "00000000 11000000",
        "00000000 11110000",
        "00000000 11111100",
        "00000000 11111111",
    ]
    mask = block_diffusion_mask(8, 2)
    for i, row in enumerate(rows):
        expected = torch.tensor([c == "1" for c in row.replace(" ", "")])
        assert torch.equal(mask[2 * i], expected)


@pytest.mark.parametrize("n,block_size", [(8, 2), (10, 4), (7, 3), (5, 1)])
def test_block_causal_mask_matches_naive_definition(n, block_size):
    assert torch.equal(block_causal_mask(n, block_size), naive_block_causal(n, block_size))


def test_block_causal_mask_with_offset_is_the_tail_of_the_full_mask():
    full = naive_block_causal(12, 4)
    assert torch.equal(block_causal_mask(8, 4, offset=4), full[4:])


def test_single_block_needs_no_mask():
    assert block_causal_mask(8, 8) is None
    assert block_causal_mask(8, 100) is None
    assert block_causal_mask(4, 4, offset=8) is None
    assert block_causal_mask(8, 4) is not None


# Flex attention (BlockMask) against dense SDPA, the oracle. fp32, tolerance 1e-5.
def _qkv(n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, size, 8, generator=generator) for size in (n, m, m))


@pytest.mark.parametrize("length,block_size", [(16, 1), (16, 4), (24, 8), (12, 3), (16, 16)])
def test_flex_block_diffusion_attention_equals_dense(length, block_size):
    q, k, v = _qkv(2 * length, 2 * length)
    dense = attend(q, k, v, naive_block_diffusion(length, block_size))
    flex = attend(q, k, v, block_diffusion_block_mask(length, block_size))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n,block_size,offset", [(16, 4, 0), (12, 3, 0), (8, 4, 8), (6, 2, 4)])
def test_flex_block_causal_attention_equals_dense(n, block_size, offset):
    q, k, v = _qkv(n, offset + n, seed=1)
    dense = attend(q, k, v, naive_block_causal(offset + n, block_size)[offset:])
    flex = attend(q, k, v, block_causal_block_mask(n, block_size, offset=offset))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_flex_attention_gradients_equal_dense():
    q, k, v = (t.requires_grad_() for t in _qkv(32, 32, seed=2))
    weights = torch.randn(2, 3, 32, 8, generator=torch.Generator().manual_seed(3))
    dense = torch.autograd.grad((attend(q, k, v, naive_block_diffusion(16, 4)) * weights).sum(), (q, k, v))
    flex = torch.autograd.grad((attend(q, k, v, block_diffusion_block_mask(16, 4)) * weights).sum(), (q, k, v))
    for got, want in zip(flex, dense, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_masks_are_built_once_per_shape():
    assert block_diffusion_block_mask(16, 4) is block_diffusion_block_mask(16, 4)
    assert block_causal_block_mask(8, 4, offset=4) is block_causal_block_mask(8, 4, offset=4)
    assert block_diffusion_block_mask(16, 4) is not block_diffusion_block_mask(16, 8)


def test_auto_backend_is_flex_on_cuda_only():
    assert use_flex("auto", torch.device("cuda")) and not use_flex("auto", torch.device("cpu"))
    assert use_flex("flex", torch.device("cpu")) and not use_flex("sdpa", torch.device("cuda"))
    with pytest.raises(UsageError, match="--attn-backend"):
        check_attn_backend("xformers")

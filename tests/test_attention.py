import pytest
import torch

from did_cli.attention import block_causal_mask, block_diffusion_mask
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

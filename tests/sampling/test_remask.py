import pytest
import torch

from did_cli.sampling.remask import remask_count, select_lowest


@pytest.mark.parametrize(
    "n,gamma,expected",
    [(10, 0.25, 3), (10, 0.35, 4), (4, 0.5, 2), (5, 0.5, 3), (7, 0.0, 0), (7, 1.0, 7), (1023, 0.5, 512)],
)
def test_remask_count_rounds_half_up(n, gamma, expected):
    assert int(remask_count(torch.tensor([n]), gamma)) == expected


def test_select_lowest_takes_the_lowest_scores_among_generated_positions():
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.5, 0.2, 0.8]])
    eligible = torch.tensor([[False, True, True, True, True, True]])  # position 0 is the prompt
    picked = select_lowest(scores, eligible, 0.4)  # round(0.4 * 5) = 2
    assert picked.tolist() == [[False, False, True, False, True, False]]


def test_ties_break_towards_the_earlier_position():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    picked = select_lowest(scores, torch.ones(1, 4, dtype=torch.bool), 0.5)
    assert picked.tolist() == [[True, True, False, False]]


def test_exact_count_per_row_with_different_prompt_lengths():
    scores = torch.rand(3, 20, generator=torch.Generator().manual_seed(0))
    eligible = torch.arange(20)[None, :] >= torch.tensor([[1], [5], [19]])
    picked = select_lowest(scores, eligible, 0.5)
    assert picked.sum(1).tolist() == [10, 8, 1]
    assert not (picked & ~eligible).any()

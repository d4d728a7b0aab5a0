import torch

from did_cli.sampling.schedules import first_hitting_calls, fixed_step_calls, most_confident


def test_first_hitting_commits_masked_positions_by_descending_key():
    keys = torch.tensor([[0.1, 0.9, 0.5, 0.7]], dtype=torch.float64)
    masked = torch.tensor([[True, True, False, True]])
    assert first_hitting_calls(keys, masked).tolist() == [[2, 0, -1, 1]]
    assert first_hitting_calls(keys, masked, tokens_per_call=2).tolist() == [[1, 0, -1, 0]]


def test_first_hitting_order_is_uniform_over_permutations():
    counts = torch.zeros(3, 3)
    keys = torch.rand(6000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = first_hitting_calls(keys, torch.ones(6000, 3, dtype=torch.bool))
    for pos in range(3):
        counts[pos] = torch.bincount(calls[:, pos], minlength=3).float() / 6000
    torch.testing.assert_close(counts, torch.full((3, 3), 1 / 3), atol=0.03, rtol=0)


def test_fixed_steps_bin_reveal_times_and_cover_every_step():
    keys = torch.tensor([[0.99, 0.74, 0.5, 0.26, 0.0]], dtype=torch.float64)
    masked = torch.ones(1, 5, dtype=torch.bool)
    assert fixed_step_calls(keys, masked, 4).tolist() == [[0, 1, 2, 2, 3]]
    masked[0, 2] = False
    assert fixed_step_calls(keys, masked, 4).tolist() == [[0, 1, -1, 2, 3]]


def test_most_confident_picks_highest_among_candidates_ties_to_lower_position():
    conf = torch.tensor([[0.2, 0.8, 0.8, 0.9]])
    cand = torch.tensor([[True, True, True, False]])
    assert most_confident(conf, cand).tolist() == [[False, True, False, False]]
    assert most_confident(conf, cand, 2).tolist() == [[False, True, True, False]]
    assert most_confident(conf, cand, 10).tolist() == [[True, True, True, False]]

import pytest
import torch

from did_cli.errors import UsageError
from did_cli.sampling.draft import draft
from did_cli.sampling.refine import refine
from did_cli.sampling.remask import select_lowest
from did_cli.settings import DraftSettings, RefineSettings, UnmaskingSettings

BOS = 67


@pytest.fixture
def drafted(tiny_model):
    return draft(tiny_model, [[BOS]] * 3 + [[BOS, 3, 4, 5, 6]], [0, 1, 2, 3], DraftSettings(length=32), seed=1)


def _refine(model, d, ids=(0, 1, 2, 3), stage=1, **kw):
    rows = list(ids)
    return refine(
        model,
        d.tokens[rows],
        d.confidence[rows],
        [d.prompt_lengths[i] for i in rows],
        list(ids),
        stage,
        RefineSettings(**kw),
        seed=1,
    )


@pytest.mark.parametrize("remask", ["snapshot", "posthoc", "random"])
@pytest.mark.parametrize("block_size", [None, 8])
def test_refine_changes_only_remasked_positions(tiny_model, drafted, remask, block_size):
    out = _refine(tiny_model, drafted, gamma=0.5, remask=remask, block_size=block_size)
    kept = ~out.remasked
    assert torch.equal(out.tokens[kept], drafted.tokens[kept])
    assert torch.equal(out.confidence[kept], drafted.confidence[kept])
    assert not (out.tokens == tiny_model.mask_id).any()
    assert (out.tokens[out.remasked] != drafted.tokens[out.remasked]).any()  # it did revise something


def test_exactly_round_gamma_n_generated_tokens_are_remasked(tiny_model, drafted):
    for gamma, expected in [(0.25, [8, 8, 8, 7]), (0.5, [16, 16, 16, 14]), (1.0, [31, 31, 31, 27])]:
        out = _refine(tiny_model, drafted, gamma=gamma)
        assert out.remasked.sum(1).tolist() == expected
        assert not out.remasked[:, 0].any() and not out.remasked[3, :5].any()


def test_snapshot_remasks_the_lowest_recorded_confidences(tiny_model, drafted):
    out = _refine(tiny_model, drafted, gamma=0.25)
    eligible = torch.arange(32)[None] >= torch.tensor([[1], [1], [1], [5]])
    expected = select_lowest(drafted.confidence, eligible, 0.25)
    assert torch.equal(out.remasked, expected)
    for row in range(4):
        remasked_conf = drafted.confidence[row][out.remasked[row]]
        kept_conf = drafted.confidence[row][eligible[row] & ~out.remasked[row]]
        assert remasked_conf.max() <= kept_conf.min()


def test_gamma_zero_changes_nothing_and_makes_no_call(tiny_model, drafted):
    out = _refine(tiny_model, drafted, gamma=0.0)
    assert torch.equal(out.tokens, drafted.tokens)
    assert out.model_calls == 0 and out.nfes == [0, 0, 0, 0]


def test_first_hitting_refine_costs_one_call_per_remasked_token(tiny_model, drafted):
    out = _refine(tiny_model, drafted, gamma=0.5)
    assert out.nfes == [16, 16, 16, 14]
    posthoc = _refine(tiny_model, drafted, gamma=0.5, remask="posthoc")
    assert posthoc.nfes == [17, 17, 17, 15]


def test_refine_is_batch_invariant_and_cache_exact(tiny_model, drafted):
    together = _refine(tiny_model, drafted, gamma=0.5, block_size=8)
    uncached = _refine(tiny_model, drafted, gamma=0.5, block_size=8, kv_cache=False)
    assert torch.equal(together.tokens, uncached.tokens)
    for i in range(4):
        alone = _refine(tiny_model, drafted, ids=(i,), gamma=0.5, block_size=8)
        assert torch.equal(alone.tokens[0], together.tokens[i])


def test_chained_stages_use_fresh_randomness(tiny_model, drafted):
    first = _refine(tiny_model, drafted, gamma=1.0, remask="random", stage=1)
    second = _refine(tiny_model, drafted, gamma=1.0, remask="random", stage=2)
    assert not torch.equal(first.tokens, second.tokens)


def test_refine_block_size_must_divide_length(tiny_model, drafted):
    with pytest.raises(UsageError, match="does not divide"):
        _refine(tiny_model, drafted, block_size=5)


def test_confidence_order_refine(tiny_model, drafted):
    out = _refine(tiny_model, drafted, gamma=0.5, unmasking=UnmaskingSettings(order="confidence", tokens_per_call=4))
    assert out.nfes == [4, 4, 4, 4]
    assert torch.equal(out.tokens[~out.remasked], drafted.tokens[~out.remasked])


@pytest.mark.parametrize("remask", ["snapshot", "posthoc", "random"])
def test_pinned_positions_are_never_remasked_even_when_least_trusted(tiny_model, drafted, remask):
    # The EOS that ends a variable-length sample is pinned: given the lowest confidence it would be remasked first.
    confidence = drafted.confidence.clone()
    confidence[:, -1] = 0.0
    pinned = torch.zeros_like(drafted.tokens, dtype=torch.bool)
    pinned[:, -1] = True
    for gamma in (0.25, 1.0):
        out = refine(tiny_model, drafted.tokens, confidence, drafted.prompt_lengths, [0, 1, 2, 3], 1,
                     RefineSettings(gamma=gamma, remask=remask), seed=1, pinned=pinned)  # fmt: skip
        assert not out.remasked[:, -1].any()
        assert torch.equal(out.tokens[:, -1], drafted.tokens[:, -1])
        eligible = (torch.arange(32)[None] >= torch.tensor(drafted.prompt_lengths)[:, None]) & ~pinned
        assert out.remasked.sum(1).tolist() == torch.floor(gamma * eligible.sum(1) + 0.5).long().tolist()
    unpinned = refine(tiny_model, drafted.tokens, confidence, drafted.prompt_lengths, [0, 1, 2, 3], 1,
                      RefineSettings(gamma=0.25), seed=1)  # fmt: skip
    assert unpinned.remasked[:, -1].all()  # without the pin, snapshot remasking takes it first

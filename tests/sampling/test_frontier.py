"""Cheaper refinement: confidence-threshold commits and `refine_cache` R (kept positions' keys/values reused)."""

import pytest
import torch

from did_cli.api import commit_stats
from did_cli.cli._sampling import unmasking
from did_cli.errors import UsageError
from did_cli.provenance import refine_stage_settings
from did_cli.sampling.draft import draft
from did_cli.sampling.primitives import draw_uniforms, sample_from_logits
from did_cli.sampling.refine import refine
from did_cli.sampling.reuse import KeptKVReuse
from did_cli.settings import DraftSettings, RefineSettings, UnmaskingSettings

BOS = 67
IDS = (0, 1, 2, 3)


@pytest.fixture
def drafted(tiny_model):
    return draft(tiny_model, [[BOS]] * 3 + [[BOS, 3, 4, 5, 6]], list(IDS), DraftSettings(length=32), seed=1)


def _refine(model, d, ids=IDS, **kw):
    rows = list(ids)
    settings = RefineSettings(**{"gamma": 0.5, **kw})
    prompts = [d.prompt_lengths[i] for i in rows]
    return refine(model, d.tokens[rows], d.confidence[rows], prompts, rows, 1, settings, seed=1)


def _threshold(value):
    return UnmaskingSettings(order="confidence", confidence_threshold=value)


def _reference_threshold_refine(model, tokens, remasked, sample_id, threshold):
    """One row, written from the rule: full forward per call, commit every masked position above the threshold and
    the most confident one; each position keeps its own token-draw uniform across calls."""
    draws = draw_uniforms(1, [sample_id], 1, tokens.shape[0], 3)[0, :, 1]
    tokens = torch.where(remasked, torch.full_like(tokens, model.mask_id), tokens)
    confidence = torch.zeros(tokens.shape[0])
    masked = remasked.clone()
    counts = []
    while masked.any():
        positions = masked.nonzero().flatten()
        with torch.inference_mode():
            logits = model(tokens[None], tokens.shape[0])[0, positions]
        drawn, probs = sample_from_logits(logits, draws[positions], mask_id=model.mask_id, top_p=0.9)
        forced = int(torch.argmax(probs))  # first maximum: ties go to the lower position
        chosen = probs > threshold
        chosen[forced] = True
        assert (probs[chosen] > threshold).sum() >= chosen.sum() - 1  # all above, but the forced one
        tokens[positions[chosen]] = drawn[chosen]
        confidence[positions[chosen]] = probs[chosen]
        masked[positions[chosen]] = False
        counts.append(int(chosen.sum()))
    return tokens, confidence, counts


@pytest.mark.parametrize("threshold", [0.03, 0.1])  # the random tiny model is rarely sure
def test_threshold_commits_follow_the_rule(tiny_model, drafted, threshold):
    out = _refine(tiny_model, drafted, unmasking=_threshold(threshold))
    assert any(max(row) > 1 for row in out.commits), "no call committed several tokens: the test would be vacuous"
    for row in range(4):
        tokens, confidence, counts = _reference_threshold_refine(
            tiny_model, drafted.tokens[row], out.remasked[row], row, threshold
        )
        assert torch.equal(out.tokens[row], tokens)
        remasked = out.remasked[row]
        torch.testing.assert_close(out.confidence[row][remasked].clone(), confidence[remasked].clone())
        histogram = {k: counts.count(k) for k in set(counts)}
        assert out.commits[row] == histogram and out.nfes[row] == len(counts)
        # At most one committed token per call (the forced one) is at or below the threshold.
        assert int((out.confidence[row][remasked] <= threshold).sum()) <= len(counts)


def test_threshold_one_equals_one_token_per_call_confidence_order(tiny_model, drafted):
    above_all = _refine(tiny_model, drafted, unmasking=_threshold(1.0))
    one_by_one = _refine(tiny_model, drafted, unmasking=UnmaskingSettings(order="confidence"))
    assert torch.equal(above_all.tokens, one_by_one.tokens)
    assert torch.equal(above_all.confidence, one_by_one.confidence)
    assert above_all.nfes == one_by_one.nfes == out_counts(above_all)
    assert all(set(row) == {1} for row in above_all.commits)


def out_counts(result):
    return [int(n) for n in result.remasked.sum(dim=1)]


def test_threshold_zero_commits_a_block_in_one_call(tiny_model, drafted):
    out = _refine(tiny_model, drafted, unmasking=_threshold(0.0))
    assert out.nfes == [1, 1, 1, 1] and out.model_calls == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"unmasking": _threshold(0.2)},
        {"refine_cache": 4},
        {"refine_cache": 16, "unmasking": _threshold(0.2)},
        {"refine_cache": 3, "remask": "posthoc", "gamma": 0.8},
    ],
)
def test_cheaper_refinement_changes_only_remasked_positions_and_is_batch_invariant(tiny_model, drafted, kw):
    together = _refine(tiny_model, drafted, **kw)
    kept = ~together.remasked
    assert torch.equal(together.tokens[kept], drafted.tokens[kept])
    assert torch.equal(together.confidence[kept], drafted.confidence[kept])
    assert not (together.tokens == tiny_model.mask_id).any()
    for i in IDS:
        alone = _refine(tiny_model, drafted, ids=(i,), **kw)
        assert torch.equal(alone.tokens[0], together.tokens[i])
        torch.testing.assert_close(alone.confidence[0], together.confidence[i])


def test_refine_cache_one_is_the_exact_refinement(tiny_model, drafted):
    exact = _refine(tiny_model, drafted)
    cached = _refine(tiny_model, drafted, refine_cache=1)
    assert torch.equal(cached.tokens, exact.tokens) and torch.equal(cached.confidence, exact.confidence)
    assert cached.full_calls == cached.model_calls
    assert refine_stage_settings(RefineSettings(), 0, 32)["refine_cache"] == 1


def test_larger_refine_cache_recomputes_everything_once_every_r_calls_and_records_r(tiny_model, drafted):
    exact = _refine(tiny_model, drafted)
    for r in (4, 16):
        out = _refine(tiny_model, drafted, refine_cache=r)
        assert out.model_calls == exact.model_calls and out.nfes == exact.nfes  # same schedule, cheaper calls
        assert out.full_calls == -(-out.model_calls // r)
        assert torch.equal(out.remasked, exact.remasked)
        assert refine_stage_settings(RefineSettings(refine_cache=r), 0, 32)["refine_cache"] == r
    # The approximation is real: stale keys/values change some token (or at least some probability).
    approx = _refine(tiny_model, drafted, refine_cache=16)
    assert not torch.equal(approx.confidence, exact.confidence)


def test_reused_keys_values_are_exact_while_the_tokens_are_unchanged(tiny_model, drafted):
    # Rows with different numbers of remasked positions exercise the padding and the per-row rotary phases.
    tokens = drafted.tokens.clone()
    remasked = torch.zeros_like(tokens, dtype=torch.bool)
    for row, positions in enumerate([[3, 9, 30], [1, 2], [31], [5, 6, 7, 20, 21]]):
        remasked[row, positions] = True
    tokens[remasked] = tiny_model.mask_id
    reuse = KeptKVReuse(tiny_model, remasked, refresh_every=8)
    select = torch.tensor([[9, 30], [2, 1], [31, 31], [20, 5]])
    with torch.inference_mode():
        exact = tiny_model(tokens, 32, select=select)
        first = reuse(tokens, select)  # the full pass that stores every position's keys/values
        second = reuse(tokens, select)  # remasked positions only, against the stored kept keys/values
        tokens[0, 3] = 7  # a committed token: now the stored kept keys/values are stale
        third = reuse(tokens, select)
        exact_after = tiny_model(tokens, 32, select=select)
    torch.testing.assert_close(first, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, exact, rtol=1e-5, atol=1e-5)
    assert reuse.full_calls == 1 and reuse.calls == 3
    torch.testing.assert_close(third[1:], exact_after[1:], rtol=1e-5, atol=1e-5)  # other rows are untouched
    assert not torch.allclose(third[0], exact[0], atol=1e-4)  # row 0 saw its new token through fresh keys


def test_contradictory_combinations_are_refused(tiny_model, drafted):
    with pytest.raises(UsageError, match="needs --order confidence"):
        UnmaskingSettings(order="first-hitting", confidence_threshold=0.9)
    with pytest.raises(UsageError, match="needs --order confidence"):
        unmasking("steps", 4, 1, 0.9, 1.0, 0.9)
    with pytest.raises(UsageError, match="drop --tokens-per-call"):
        unmasking(None, None, 2, 0.9, 1.0, 0.9)
    with pytest.raises(UsageError, match=r"in \[0, 1\]"):
        UnmaskingSettings(order="confidence", confidence_threshold=1.5)
    with pytest.raises(UsageError, match="refine-cache"):
        RefineSettings(refine_cache=0)
    with pytest.raises(UsageError, match="global refine block"):
        _refine(tiny_model, drafted, refine_cache=4, block_size=8)
    assert unmasking(None, None, 1, 0.9, 1.0, 0.7) == _threshold(0.7)  # the threshold alone implies the order


def test_commit_stats():
    assert commit_stats({1: 3, 4: 1}) == {
        "tokens_per_call_mean": 7 / 4,
        "tokens_per_call_max": 4,
        "tokens_per_call_histogram": {"1": 3, "4": 1},
    }
    assert commit_stats({})["tokens_per_call_mean"] == 0.0


def test_threshold_drafting_commits_several_tokens_per_call(tiny_model):
    settings = DraftSettings(length=32, block_size=8, unmasking=_threshold(0.0))
    out = draft(tiny_model, [[BOS]] * 2, [0, 1], settings, seed=1)
    assert out.nfes == [4, 4]  # one call per block of 8 (the first block holds BOS)
    assert out.commits[0] == {7: 1, 8: 3}

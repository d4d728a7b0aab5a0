"""Pure pieces of the protocol: window layout, entropy and both aggregations, with no model involved."""

import math

import pytest
import torch

from did_cli.errors import UsageError
from did_cli.evaluation import (
    EvalSettings,
    SampleResult,
    Window,
    score_sequence,
    sliding_windows,
    summarize,
    target_nlls,
    unigram_entropy,
)


def test_windows_follow_the_bd3lm_layout_for_2048_tokens():
    assert sliding_windows(2048, 1024, 512) == [Window(0, 1024, 1), Window(512, 1536, 1024), Window(1024, 2048, 1536)]


def test_a_sample_within_the_context_is_one_window():
    assert sliding_windows(700, 1024, 512) == [Window(0, 700, 1)]
    assert sliding_windows(1, 1024, 512) == []  # BOS alone: nothing to score


@pytest.mark.parametrize("num_tokens", [2, 15, 16, 17, 23, 24, 25, 40, 41, 100])
@pytest.mark.parametrize(("context", "stride"), [(16, 8), (16, 15), (16, 1), (10, 3)])
@pytest.mark.parametrize("first_target", [1, 5, 30])
def test_sliding_windows_score_each_token_exactly_once(num_tokens, context, stride, first_target):
    windows = sliding_windows(num_tokens, context, stride, first_target)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert scored == list(range(first_target, num_tokens))  # in order, no gap, no repeat
    for w in windows:
        assert 0 <= w.begin < w.first_target < w.end <= num_tokens  # every target has context in its window
        assert w.end - w.begin <= context


def test_later_windows_keep_at_least_context_minus_stride_tokens_of_context():
    for w in sliding_windows(100, 16, 8)[1:]:
        assert w.first_target - w.begin >= 16 - 8


@pytest.mark.parametrize(("context", "stride"), [(16, 16), (16, 0), (1, 1)])
def test_windows_refuse_a_stride_that_leaves_a_token_without_context(context, stride):
    with pytest.raises(UsageError):
        sliding_windows(50, context, stride)


def test_settings_cap_the_context_at_the_judge_and_default_the_stride_to_half():
    assert EvalSettings().windows_for(1024) == (1024, 512)
    assert EvalSettings().windows_for(64) == (64, 32)
    assert EvalSettings(context=16, stride=5).windows_for(None) == (16, 5)
    with pytest.raises(UsageError, match="stride 512"):
        EvalSettings(stride=512).windows_for(64)
    with pytest.raises(UsageError):
        EvalSettings(batch_size=0)


def _bigram_logits(input_ids, attention_mask):
    # A judge whose prediction depends only on the previous token: log p(next = v | prev = u) is fixed.
    table = torch.log_softmax(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)), -1)
    return table[input_ids]


def test_target_nlls_of_a_context_free_judge_match_a_bigram_table_and_skip_the_prompt():
    tokens = [0, 3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    table = _bigram_logits(torch.arange(10), None)
    (nll,) = target_nlls([tokens], _bigram_logits, context=4, stride=2, first_targets=[3])
    expected = [math.nan] * 3 + [-float(table[tokens[t - 1], tokens[t]]) for t in range(3, len(tokens))]
    torch.testing.assert_close(nll, torch.tensor(expected, dtype=torch.float64), equal_nan=True, atol=1e-6, rtol=0)


def test_unigram_entropy_in_nats():
    assert unigram_entropy([]) == 0.0
    assert unigram_entropy([7] * 10) == 0.0
    assert unigram_entropy([1, 2, 1, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))


def test_score_sequence_excludes_eos_targets_and_counts_bos_in_the_entropy():
    tokens = [9, 1, 9, 2, 3]  # BOS/EOS = 9
    nlls = torch.tensor([math.nan, 1.0, 50.0, 2.0, 3.0], dtype=torch.float64)
    result = score_sequence(tokens, nlls, eos_ids=frozenset({9}), degenerate_entropy=0.5)
    assert (result.tokens, result.scored_tokens, result.nll_sum) == (4, 3, 6.0)
    assert result.nll == pytest.approx(2.0) and result.ppl == pytest.approx(math.exp(2.0))
    assert result.entropy == pytest.approx(unigram_entropy(tokens)) and not result.degenerate


def _sample(nll_sum, scored, entropy=5.0, tokens=None):
    return SampleResult(None, None, tokens if tokens is not None else scored, scored, nll_sum, entropy, entropy < 4.0)


def test_gen_ppl_is_the_mean_of_sample_ppls_and_pooled_is_exp_of_the_token_weighted_nll():
    samples = [_sample(1.0, 1), _sample(6.0, 2, entropy=3.0), _sample(0.0, 0, entropy=0.0, tokens=2)]
    result = summarize("f", samples)
    assert result.gen_ppl == pytest.approx((math.exp(1.0) + math.exp(3.0)) / 2)  # the empty sample is left out
    assert result.gen_ppl_pooled == pytest.approx(math.exp(7.0 / 3))
    assert result.gen_ppl > result.gen_ppl_pooled  # mean of exp >= exp of mean: why the two must not be mixed up
    assert result.entropy == pytest.approx(8.0 / 3)
    assert (result.num_samples, result.num_degenerate, result.num_unscored, result.num_scored_tokens) == (3, 2, 1, 3)
    assert result.mean_tokens == pytest.approx(5 / 3)


def test_a_file_without_a_scored_token_reports_null_not_nan():
    summary = summarize("f", [_sample(0.0, 0, entropy=0.0)]).summary()
    assert summary["gen_ppl"] is None and summary["gen_ppl_pooled"] is None and summary["num_unscored"] == 1

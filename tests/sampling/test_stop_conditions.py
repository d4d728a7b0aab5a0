"""Entropy rejection and variable-length stopping (BD3-LM's `_check_stop_conds`) on context-free fake denoisers.

The fake denoisers ignore their input: every position gets the same fixed distribution. With top-p 1 a position's
token is then the inverse CDF of its own draw uniform, so each test predicts every sample from `draw_uniforms` alone
and checks the sampler against that independent computation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from did_cli.errors import SamplingError, UsageError
from did_cli.sampling.draft import draft
from did_cli.sampling.primitives import draw_uniforms, window_entropy
from did_cli.settings import DraftSettings, UnmaskingSettings
from tests.bd3lm_reference import bd3lm_var_length
from tests.conftest import make_tiny_model

EOS = 67  # BOS and EOS are one token, as in GPT-2
A, B, C = 3, 5, 7
SEED = 7


def _fixed_model(probs: dict[int, float], length: int = 32):
    """A tiny BD3-LM whose logits are the same at every position: log-probabilities `probs`, others excluded."""
    model = make_tiny_model(model_length=length)
    bias = torch.full((model.config.vocab_size,), -1e4)
    for token, p in probs.items():
        bias[token] = math.log(p)
    with torch.no_grad():
        model.backbone.output_layer.linear.weight.zero_()
        model.backbone.output_layer.linear.bias.copy_(bias)
    return model


def _settings(**kw) -> DraftSettings:
    unmasking = UnmaskingSettings(top_p=1.0)
    return DraftSettings(**{"length": 32, "block_size": 4, "unmasking": unmasking, **kw})


def _predicted(sample_id: int, attempt: int, probs: dict[int, float], length: int = 32) -> list[int]:
    """Sample `sample_id`'s tokens at one attempt: BOS, then the inverse CDF (in vocabulary order) of each draw."""
    draws = draw_uniforms(SEED, [sample_id], 0, length, 2, attempt=attempt)[0, :, 1].tolist()
    order = sorted(probs)
    tokens = [EOS]
    for u in draws[1:]:
        cumulative = 0.0
        for token in order:
            cumulative += probs[token]
            if u < cumulative:
                break
        tokens.append(token)
    return tokens


def _entropy(tokens: list[int]) -> float:
    counts = Counter(tokens)
    return -sum(n / len(tokens) * math.log(n / len(tokens)) for n in counts.values())


def _is_rejected(tokens: list[int], window: int, threshold: float, block: int = 4) -> bool:
    """The rule written out: after each block, once the sequence is longer than the window, test its last window."""
    ends = [end for end in range(block, len(tokens) + 1, block) if end > window]
    return any(_entropy(tokens[end - window : end]) < threshold for end in ends)


def test_window_entropy_matches_a_direct_count():
    tokens = torch.randint(0, 6, (5, 40), generator=torch.Generator().manual_seed(0))
    got = window_entropy(tokens, 33, 20)
    expected = torch.tensor([_entropy(row[13:33]) for row in tokens.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_a_model_that_always_repeats_is_redrawn_until_the_tries_run_out():
    model = _fixed_model({A: 1.0})
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    settings = _settings(entropy_window=8, reject_entropy=0.5, max_tries=3)
    with pytest.raises(SamplingError, match="all 3 tries"):
        draft(model, [[EOS]], [0], settings, SEED)
    assert len(calls) == 3 * 31  # three full draws of 31 first-hitting calls, then failure


def test_rejected_samples_are_redrawn_the_predicted_number_of_times():
    probs = {A: 0.8, B: 0.2}
    window, threshold = 8, 0.3  # only an all-A (or all-B) window is below 0.3 nats
    model = _fixed_model(probs)
    settings = _settings(entropy_window=window, reject_entropy=threshold, max_tries=10)
    ids = list(range(12))
    out = draft(model, [[EOS]] * len(ids), ids, settings, SEED)
    for row, sample_id in enumerate(ids):
        attempt = 0
        while _is_rejected(_predicted(sample_id, attempt, probs), window, threshold):
            attempt += 1
        assert out.tries[row] == attempt + 1
        assert out.tokens[row].tolist() == _predicted(sample_id, attempt, probs)
    assert max(out.tries) > 1 and min(out.tries) == 1  # the case is not trivial


def test_rejection_keeps_batch_invariance_and_the_cache_oracle():
    model = _fixed_model({A: 0.8, B: 0.2})
    settings = _settings(entropy_window=8, reject_entropy=0.3)
    ids = [3, 4, 5, 6, 7, 8]
    together = draft(model, [[EOS]] * len(ids), ids, settings, SEED)
    oracle = _settings(entropy_window=8, reject_entropy=0.3, kv_cache=False)
    uncached = draft(model, [[EOS]] * len(ids), ids, oracle, SEED)
    assert torch.equal(together.tokens, uncached.tokens) and together.tries == uncached.tries
    for row, sample_id in enumerate(ids):
        alone = draft(model, [[EOS]], [sample_id], settings, SEED)
        assert torch.equal(alone.tokens[0], together.tokens[row])
        assert alone.tries[0] == together.tries[row]


def test_rejection_on_a_real_model_is_batch_invariant(tiny_model):
    # A random tiny model with a low bar: some samples are redrawn; batch 1 must equal batch N.
    settings = DraftSettings(length=32, block_size=4, entropy_window=8, reject_entropy=1.45)
    ids = list(range(6))
    together = draft(tiny_model, [[EOS]] * 6, ids, settings, SEED)
    assert max(together.tries) > 1
    for row in range(6):
        alone = draft(tiny_model, [[EOS]], [row], settings, SEED)
        assert torch.equal(alone.tokens[0], together.tokens[row]) and alone.tries[0] == together.tries[row]


def test_rejection_off_and_short_samples_never_redraw():
    model = _fixed_model({A: 1.0})
    off = draft(model, [[EOS]], [0], _settings(entropy_window=8, reject_entropy=0.0), SEED)
    short = draft(model, [[EOS]], [0], _settings(), SEED)  # 32 tokens never exceed the default window of 256
    assert off.tries == [1] and short.tries == [1]
    assert off.tokens[0].tolist() == [EOS] + [A] * 31


def test_var_length_stops_at_the_first_generated_eos_and_keeps_it():
    probs = {A: 0.85, EOS: 0.15}
    model = _fixed_model(probs)
    ids = list(range(8))
    settings = _settings(var_length=True, entropy_window=8, reject_entropy=0.0)
    fixed = draft(model, [[EOS]] * 8, ids, _settings(), SEED)
    out = draft(model, [[EOS]] * 8, ids, settings, SEED, eos_id=EOS)
    stopped = 0
    for row, sample_id in enumerate(ids):
        predicted = _predicted(sample_id, 0, probs)
        first = next((i for i in range(1, 32) if predicted[i] == EOS), None)
        expected_length = 32 if first is None else first + 1
        assert out.lengths[row] == expected_length == bd3lm_var_length(predicted, 4, EOS, window=8, threshold=0.0)
        assert out.tokens[row, :expected_length].tolist() == predicted[:expected_length]
        assert fixed.tokens[row].tolist() == predicted  # without --var-length the sample runs to the end
        stopped += first is not None
    assert stopped >= 4


def test_var_length_is_batch_invariant_and_uses_fewer_calls_when_all_stop():
    model = _fixed_model({A: 0.5, EOS: 0.5})
    settings = _settings(var_length=True, entropy_window=8)
    out = draft(model, [[EOS]] * 4, [0, 1, 2, 3], settings, SEED, eos_id=EOS)
    for row in range(4):
        alone = draft(model, [[EOS]], [row], settings, SEED, eos_id=EOS)
        assert alone.lengths[0] == out.lengths[row]
        assert torch.equal(alone.tokens[0, : out.lengths[row]], out.tokens[row, : out.lengths[row]])
    assert out.model_calls == 11  # every sample stopped at the first check, after the block ending at 12


def test_var_length_drops_the_last_window_on_low_entropy():
    model = _fixed_model({A: 1.0})
    out = draft(model, [[EOS]], [0], _settings(var_length=True, entropy_window=8, reject_entropy=0.5), SEED, eos_id=EOS)
    assert out.tries == [1]
    assert out.lengths == [12 - 8]  # first check after the block ending at 12, which drops its last 8 tokens


def _kind(tokens: list[int], kept: int, window: int) -> str:
    """How BD3-LM's rule ended a draw: run to the end, cut at its EOS, or cut by low entropy (after an early EOS)."""
    first = next((i for i in range(1, len(tokens)) if tokens[i] == EOS), None)
    if kept == len(tokens):
        return "whole"
    if first is not None and kept == first + 1:
        return "eos"
    return "entropy after an early eos" if first is not None and first < window else "entropy"


@pytest.mark.parametrize("block", [2, 4, 8])
def test_var_length_cuts_each_draw_where_bd3lms_rule_cuts_it(block):
    # Four outcomes, each compared with the rule stated in tests/bd3lm_reference.py: whole draws, EOS cuts, entropy
    # cuts, and an EOS before the window whose first check (window + B) finds low entropy: upstream cuts at
    # end - window there, so the sample keeps B tokens; stopping at that EOS is the bug this test pins down.
    probs = {A: 0.55, B: 0.3, C: 0.13, EOS: 0.02}
    window, threshold, length = 16, 0.9, 48
    model = _fixed_model(probs, length)
    settings = _settings(length=length, block_size=block, var_length=True, entropy_window=window,
                         reject_entropy=threshold)  # fmt: skip
    ids = list(range(64))
    out = draft(model, [[EOS]] * len(ids), ids, settings, SEED, eos_id=EOS)
    kinds = Counter()
    for row, sample_id in enumerate(ids):
        predicted = _predicted(sample_id, 0, probs, length)
        kept = bd3lm_var_length(predicted, block, EOS, window, threshold)
        assert (out.lengths[row], out.tries[row]) == (kept, 1)
        assert out.tokens[row, :kept].tolist() == predicted[:kept]
        kinds[_kind(predicted, kept, window)] += 1
        if _kind(predicted, kept, window) == "entropy after an early eos":
            assert kept == block
    assert set(kinds) == {"whole", "eos", "entropy", "entropy after an early eos"}, kinds


@pytest.mark.parametrize(("block", "window", "threshold"), [(2, 16, 1.0), (4, 16, 1.0), (8, 16, 1.0), (4, 256, 4.0)])
def test_an_early_eos_is_overridden_by_a_low_entropy_first_check(block, window, threshold):
    # Nothing is checked up to the window (BD3-LM: 256 tokens); the first check, at window + B, sees the tokens after
    # the EOS, finds them repetitive, and cuts at end - window: every sample keeps B tokens, not its EOS.
    probs = {A: 0.9, EOS: 0.1}
    length = window + 2 * block
    model = _fixed_model(probs, length)
    settings = _settings(length=length, block_size=block, var_length=True, entropy_window=window,
                         reject_entropy=threshold)  # fmt: skip
    ids = list(range(4))
    out = draft(model, [[EOS]] * 4, ids, settings, SEED, eos_id=EOS)
    for row, sample_id in enumerate(ids):
        predicted = _predicted(sample_id, 0, probs, length)
        assert EOS in predicted[1:window]
        assert out.lengths[row] == block == bd3lm_var_length(predicted, block, EOS, window, threshold)
        assert out.tokens[row, :block].tolist() == predicted[:block]


def test_var_length_on_a_real_model_is_bd3lms_rule_applied_to_its_fixed_length_draw():
    # A random tiny model that favours EOS: each variable-length sample must be its fixed-length draw (same seed, same
    # id), cut where the stated rule cuts it, in a batch, alone, and through the uncached oracle.
    model = make_tiny_model(model_length=48)
    with torch.no_grad():
        model.backbone.output_layer.linear.bias[EOS] += 3.0
    window, threshold, ids = 16, 2.2, list(range(16))
    fixed = draft(model, [[EOS]] * 16, ids, DraftSettings(length=48, reject_entropy=0.0), SEED)
    settings = DraftSettings(length=48, entropy_window=window, reject_entropy=threshold, var_length=True)
    out = draft(model, [[EOS]] * 16, ids, settings, SEED, eos_id=EOS)
    uncached = draft(model, [[EOS]] * 16, ids, replace(settings, kv_cache=False), SEED, eos_id=EOS)
    kinds = Counter()
    for row in ids:
        full = fixed.tokens[row].tolist()
        kept = bd3lm_var_length(full, 4, EOS, window, threshold)
        assert out.lengths[row] == uncached.lengths[row] == kept
        assert out.tokens[row, :kept].tolist() == uncached.tokens[row, :kept].tolist() == full[:kept]
        kinds[_kind(full, kept, window)] += 1
    alone = draft(model, [[EOS]], [5], settings, SEED, eos_id=EOS)
    assert alone.tokens[0, : out.lengths[5]].tolist() == out.tokens[5, : out.lengths[5]].tolist()
    assert kinds["eos"] and kinds["entropy after an early eos"], kinds


def test_var_length_cuts_nothing_before_the_window():
    # Upstream checks only once a sample is longer than 256 tokens: a 32-token draw is never cut, EOS or not.
    probs = {A: 0.5, EOS: 0.5}
    model = _fixed_model(probs)
    out = draft(model, [[EOS]] * 4, [0, 1, 2, 3], _settings(var_length=True), SEED, eos_id=EOS)
    assert out.lengths == [32] * 4
    for row in range(4):
        assert out.tokens[row].tolist() == _predicted(row, 0, probs) and EOS in _predicted(row, 0, probs)[1:]


def test_block_size_1_redraws_every_stopped_sample_as_bd3lm_does():
    # Upstream returns None on `stop and x.shape[-1] == 1`, x being the last block: at B = 1 any stop is a redraw.
    probs = {A: 0.6, B: 0.36, EOS: 0.04}
    window, threshold, length = 8, 0.3, 16
    model = _fixed_model(probs)
    settings = _settings(length=length, block_size=1, var_length=True, entropy_window=window, reject_entropy=threshold)
    ids = list(range(12))
    out = draft(model, [[EOS]] * len(ids), ids, settings, SEED, eos_id=EOS)
    for row, sample_id in enumerate(ids):
        attempt = 0
        while bd3lm_var_length(_predicted(sample_id, attempt, probs, length), 1, EOS, window, threshold) is None:
            attempt += 1
        assert out.tries[row] == attempt + 1
        assert out.lengths[row] == length
        assert out.tokens[row].tolist() == _predicted(sample_id, attempt, probs, length)
    assert max(out.tries) > 1 and min(out.tries) == 1


def test_block_size_1_fails_after_max_tries_when_every_draw_stops():
    model = _fixed_model({A: 0.5, EOS: 0.5})
    settings = _settings(length=16, block_size=1, var_length=True, entropy_window=8, max_tries=3)
    assert all(bd3lm_var_length(_predicted(0, k, {A: 0.5, EOS: 0.5}, 16), 1, EOS, 8) is None for k in range(3))
    with pytest.raises(SamplingError, match="block size 1"):
        draft(model, [[EOS]], [0], settings, SEED, eos_id=EOS)


def test_var_length_needs_an_eos_id():
    with pytest.raises(UsageError, match="EOS"):
        draft(make_tiny_model(), [[EOS]], [0], _settings(var_length=True), SEED)


def test_bad_stop_settings_are_usage_errors():
    with pytest.raises(UsageError, match="reject_entropy"):
        _settings(reject_entropy=-1.0)
    with pytest.raises(UsageError, match="max-tries"):
        _settings(max_tries=0)

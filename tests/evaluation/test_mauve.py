"""MAUVE with judge features: the features against a direct forward pass, batching, and the score's behaviour."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from did_cli.errors import UsageError
from did_cli.evaluation.judge import load_judge
from did_cli.evaluation.mauve import (
    MauveSettings,
    MauveUnavailable,
    judge_features,
    mauve_available,
    mauve_score,
    mauve_unavailable,
)

WORDS = (
    "the of and a to in is was for on that with as by he it at from his an were are which this also be or had first "
    "one their its new after who they has two her she been other when there all during into school time may years"
).split()

needs_mauve = pytest.mark.skipif(not mauve_available(), reason="mauve-text is not installed")


@pytest.fixture(scope="module")
def judge():
    return load_judge("did-tiny-judge")


def varied_texts(n: int, seed: int) -> list[str]:
    """n texts of 5 to 30 words drawn from a fixed vocabulary: one distribution, different lengths."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n)]


def direct_last_hidden_state(judge, ids: list[int]) -> torch.Tensor:
    """The last position's final-layer hidden state of one unpadded sequence, straight from transformers."""
    with torch.no_grad():
        out = judge.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1]


def test_features_are_the_last_tokens_final_hidden_state_after_bos(judge):
    texts = ["the cat sat on the mat.", "a", "", "one two three four five six seven eight nine ten " * 3]
    features = judge_features(texts, judge, max_tokens=12, batch_size=4)
    assert features.dtype == torch.float32 and features.shape == (4, judge.model.config.hidden_size)
    bos = judge.tokenizer.bos_token_id
    for text, row in zip(texts, features, strict=True):
        ids = [bos, *judge.tokenizer(text, add_special_tokens=False)["input_ids"]][:12]
        torch.testing.assert_close(row, direct_last_hidden_state(judge, ids), rtol=1e-5, atol=1e-5)


def test_a_text_that_starts_with_bos_gets_no_second_one(judge):
    bos_text = judge.tokenizer.bos_token + "the cat"
    both = judge_features([bos_text, "the cat"], judge, max_tokens=64, batch_size=2)
    torch.testing.assert_close(both[0], both[1], rtol=0, atol=0)


def test_features_are_capped_at_the_judges_positions(judge):
    long_text = " ".join(["word"] * (2 * judge.max_positions))
    capped = judge_features([long_text], judge, max_tokens=10**6, batch_size=1)
    ids = [judge.bos_id, *judge.encode(long_text)][: judge.max_positions]
    torch.testing.assert_close(capped[0], direct_last_hidden_state(judge, ids), rtol=1e-5, atol=1e-5)


def test_batch_1_and_batch_n_give_the_same_features(judge):
    texts = varied_texts(9, seed=1)
    one = judge_features(texts, judge, max_tokens=64, batch_size=1)
    many = judge_features(texts, judge, max_tokens=64, batch_size=4)
    # Right padding never reaches a real position of a causal LM; only kernel float noise may differ.
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


@needs_mauve
def test_mauve_of_a_set_against_itself_is_one_and_against_one_repeated_sentence_far_lower(judge):
    texts = varied_texts(40, seed=0)
    same = mauve_score(texts, texts, judge)
    assert same.mauve == pytest.approx(1.0, abs=1e-9) and same.frontier_integral == pytest.approx(0.0, abs=1e-9)
    assert (same.num_p, same.num_q, same.num_buckets) == (40, 40, 4)  # "auto": min(n_p, n_q) / 10
    assert (
        same.max_tokens == judge.max_positions == 256 and same.seed == 25
    )  # 1024 capped at the judge's 256 and same.scaling_factor == 5.0

    repeated = mauve_score(texts, ["the cat sat on the mat."] * 40, judge)
    assert repeated.mauve < 0.1
    other_draw = mauve_score(texts, varied_texts(40, seed=2), judge)
    assert other_draw.mauve > 0.5 > repeated.mauve  # the same distribution scores far above a degenerate one


@needs_mauve
def test_mauve_is_deterministic_and_honours_its_settings(judge):
    texts, references = varied_texts(30, seed=3), varied_texts(30, seed=4)
    settings = MauveSettings(num_buckets=5, max_tokens=16, batch_size=3)
    first, second = (mauve_score(texts, references, judge, settings) for _ in range(2))
    assert first == second
    assert first.num_buckets == 5 and first.max_tokens == 16
    sharper = mauve_score(texts, references, judge, MauveSettings(num_buckets=5, max_tokens=16, scaling_factor=50.0))
    assert sharper.mauve < first.mauve  # exp(-c·KL) falls with c wherever the histograms differ


@needs_mauve
def test_reference_mauve_scores_each_file_against_the_same_references(judge):
    from did_cli.evaluation import EvalSettings, ReferenceMauve, Sample

    texts = varied_texts(20, seed=5)
    against = ReferenceMauve([Sample(t) for t in texts], judge, EvalSettings())
    whole, half = against([Sample(t) for t in texts]), against([Sample(t) for t in texts[:10]])
    assert whole.mauve == pytest.approx(1.0, abs=1e-9) and half.num_p == 10 and half.num_q == 20
    assert whole == against([Sample(t) for t in texts])  # the reference is featurised once, the same each time


def test_too_few_texts_are_refused(judge):
    with pytest.raises(UsageError, match="at least 2 reference texts"):
        mauve_score(["a b", "c d"], ["a b"], judge)
    with pytest.raises(UsageError, match="at least 2 buckets"):
        MauveSettings(num_buckets=1)


def test_without_mauve_text_the_score_raises_and_the_report_says_skipped(judge, monkeypatch):
    monkeypatch.setitem(sys.modules, "mauve", None)  # `import mauve` now fails as when it is not installed
    assert not mauve_available()
    with pytest.raises(MauveUnavailable, match=r"not installed \(pip install 'did\[mauve\]'\)"):
        mauve_score(["a b", "c d"], ["a b", "c d"], judge)
    assert mauve_unavailable() == "MAUVE skipped: mauve-text is not installed (pip install 'did[mauve]')"


@pytest.mark.parametrize(
    ("max_tokens", "record_lengths", "expected"),
    [
        (None, [None, None], 256),  # plain text: 1024, capped at the judge's 256 positions
        (None, [32, 48], 48),  # records: the longest sampling length, for the reference too
        (20, [32, 48], 20),  # --max-tokens wins
        (0, [32], 256),  # 0: everything the judge can take
    ],
)
def test_eval_ppl_cuts_inputs_and_reference_at_one_length(judge, max_tokens, record_lengths, expected):
    from did_cli.evaluation import EvalSettings, Sample
    from did_cli.evaluation.gen_ppl import mauve_cut

    samples = [Sample("x", max_tokens=n) for n in record_lengths] + [Sample("y")]
    assert mauve_cut(EvalSettings(max_tokens=max_tokens), samples, judge) == expected


def test_mauve_from_few_texts_is_noted_in_the_sweeps_words_by_one_function():
    from did_cli.evaluation.mauve import few_texts_note

    assert few_texts_note(24, 30) == (
        "MAUVE from 24 samples per file is coarse (k-means on so few texts has 2 buckets; mauve-text's authors use "
        "thousands)"
    )
    assert few_texts_note(100, 10).startswith("MAUVE against 10 reference texts is coarse")
    assert few_texts_note(25, 25) is None

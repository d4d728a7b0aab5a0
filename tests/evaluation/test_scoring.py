"""Scoring with a tiny random GPT-2 judge: our numbers against direct computations written out here."""

import math

import pytest
import torch

from did_cli.errors import ModelLoadError
from did_cli.evaluation import EvalSettings, Sample, eval_ppl, load_judge, score_samples, target_nlls

EOT = "<|endoftext|>"
BOS = 67  # <|endoftext|> in the character tokenizer
TEXT_40 = "the quick brown fox jumps over the lazy"  # 39 characters: 40 tokens with BOS


def _ids(judge, text):
    return [BOS, *judge.encode(text)]


def _nll_given(judge, context_ids, target):
    """-log p(target | context_ids), one forward pass over exactly that context."""
    with torch.no_grad():
        logits = judge.model(torch.tensor([context_ids])).logits[0, -1]
    return -float(torch.log_softmax(logits.double(), -1)[target])


def test_the_judge_tokenizes_one_token_per_character(judge):
    assert judge.bos_id == BOS and judge.eos_ids == {BOS} and judge.max_positions == 64
    assert _ids(judge, "ab" + EOT) == [BOS, 0, 1, BOS]


def test_sample_nll_equals_a_direct_computation(judge):
    text = "the cat sat on the mat."
    ids = _ids(judge, text)
    with torch.no_grad():
        logits = judge.model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    expected = -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))

    result = score_samples([text], judge).samples[0]
    assert result.tokens == result.scored_tokens == len(text)
    assert result.nll_sum == pytest.approx(expected, abs=1e-4)
    assert result.ppl == pytest.approx(math.exp(expected / len(text)), rel=1e-5)


@pytest.mark.parametrize("text", [TEXT_40, TEXT_40[:36]])
def test_sliding_window_gives_each_token_the_context_of_its_window(judge, text):
    ids = _ids(judge, text)
    n = len(ids)

    # Written out for context 16, stride 8 (upstream's layout): [0,16) scores 1..15, then window i starts at 8i and
    # scores 8i + 8 .. 8i + 15; for n = 37 the last window is [24, 37), 13 tokens, and scores 32..36.
    def begin(t):
        return 0 if t < 16 else 8 * (t // 8 - 1)

    expected = [_nll_given(judge, ids[begin(t) : t], ids[t]) for t in range(1, n)]
    (nll,) = target_nlls([ids], judge, context=16, stride=8)
    torch.testing.assert_close(nll[1:], torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)

    full = [_nll_given(judge, ids[:t], ids[t]) for t in range(1, n)]
    # The judge does see the difference in context, so a wrong window would fail the comparison above.
    assert max(abs(a - b) for a, b in zip(expected, full, strict=True)) > 1e-2

    result = score_samples([text], judge, EvalSettings(context=16, stride=8)).samples[0]
    assert result.scored_tokens == n - 1  # each token once
    assert result.nll_sum == pytest.approx(sum(expected), abs=1e-4)


def test_eos_targets_are_excluded(judge):
    text = "ab" + EOT + "cd" + EOT
    ids = _ids(judge, text)
    assert ids == [BOS, 0, 1, BOS, 2, 3, BOS]
    expected = sum(_nll_given(judge, ids[:t], ids[t]) for t in (1, 2, 4, 5))
    result = score_samples([text], judge).samples[0]
    assert (result.tokens, result.scored_tokens) == (6, 4)
    assert result.nll_sum == pytest.approx(expected, abs=1e-4)


def test_a_prompt_is_context_but_not_scored(judge):
    ids = _ids(judge, "abc" + "xyz")
    expected = sum(_nll_given(judge, ids[:t], ids[t]) for t in (4, 5, 6))
    result = score_samples([Sample("xyz", prompt="abc")], judge).samples[0]
    assert (result.tokens, result.scored_tokens) == (3, 3)
    assert result.nll_sum == pytest.approx(expected, abs=1e-4)


def test_text_decoded_with_its_leading_endoftext_scores_like_the_bare_text(judge):
    with_bos, bare = score_samples([EOT + "hello there", "hello there"], judge).samples
    assert with_bos == bare


def test_batching_changes_nothing_beyond_float_noise(judge):
    texts = [TEXT_40 * 3, "hi", TEXT_40, "a" + EOT + "b", TEXT_40[:20] * 4, "x", "."]
    samples = [Sample(t) for t in texts] + [Sample("and so on", prompt=TEXT_40 * 2)]
    settings = {b: EvalSettings(context=24, stride=10, batch_size=b) for b in (1, 3, 4)}
    results = {b: score_samples(samples, judge, s) for b, s in settings.items()}
    one = torch.tensor([s.nll_sum for s in results[1].samples], dtype=torch.float64)
    for b in (3, 4):
        other = torch.tensor([s.nll_sum for s in results[b].samples], dtype=torch.float64)
        torch.testing.assert_close(other, one, atol=1e-4, rtol=1e-6)
        assert results[b].gen_ppl == pytest.approx(results[1].gen_ppl, rel=1e-6)
        assert results[b].gen_ppl_pooled == pytest.approx(results[1].gen_ppl_pooled, rel=1e-6)


def test_repetitive_samples_are_flagged_degenerate(judge):
    result = score_samples(["aaaaaaaaaaaaaaaaaaaa", TEXT_40], judge, EvalSettings(degenerate_entropy=2.0))
    assert [s.degenerate for s in result.samples] == [True, False]
    assert result.num_degenerate == 1


def test_eval_ppl_reports_the_judge_the_effective_window_and_versions(judge_folder, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_40 + "\n\n" + "hello\n")
    result = eval_ppl([tmp_path / "a.txt"], str(judge_folder), device="cpu")
    assert result.settings["context"] == 64 and result.settings["stride"] == 32  # capped at n_positions
    assert result.judge["name"] == str(judge_folder) and len(result.judge["sha256"]) == 64
    assert result.versions["torch"] and result.files[0].num_samples == 2
    assert [s.line for s in result.files[0].samples] == [1, 3]


def test_an_uncached_hub_judge_offline_is_one_line_naming_the_folder_option():
    with pytest.raises(ModelLoadError) as caught:
        load_judge("did-tests/no-such-judge")
    message = str(caught.value)
    assert "--judge FOLDER" in message and "\n" not in message


def test_a_folder_that_is_not_a_causal_lm_is_a_load_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError, match="could not load judge"):
        load_judge(str(tmp_path))

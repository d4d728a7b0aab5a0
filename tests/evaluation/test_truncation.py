"""Upstream's re-tokenisation cut (`max_length` = the sampling length), its window layout, and space clean-up."""

import math
import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from did_cli.errors import UsageError
from did_cli.evaluation import EvalSettings, Sample, Window, eval_ppl, read_samples, score_samples, sliding_windows
from did_cli.records import Record

BOS = 67  # <|endoftext|> in the character tokenizer
CONTEXT, STRIDE = 64, 32  # the tiny judge's own limit, and half of it


def _text(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij klmno") for _ in range(n))


def _upstream_style_nll(judge, ids: list[int]) -> tuple[float, int]:
    """Summed NLL and count of non-EOS targets, windows laid out as upstream's loop: start i·stride, score the tail."""
    n = len(ids)
    nll, valid = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    for i in range(max(math.ceil((n - CONTEXT + STRIDE) / STRIDE), 1)):
        start = 0 if i == 0 else i * STRIDE
        end = min(start + CONTEXT, n)
        chunk = torch.tensor([ids[start:end]])
        with torch.no_grad():
            logits = judge.model(chunk).logits[0].double()
        losses = F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="none")
        is_valid = chunk[0, 1:] != BOS
        first = start + 1 if i == 0 else start + CONTEXT - STRIDE
        nll[first:end] = losses[-(end - first) :]
        valid[first:end] = is_valid[-(end - first) :]
    return float(nll[valid].sum()), int(valid.sum())


def _entropy(ids: list[int]) -> float:
    return -sum(c / len(ids) * math.log(c / len(ids)) for c in Counter(ids).values())


def test_a_1030_token_sample_window_layout_is_upstreams():
    assert sliding_windows(1030, 1024, 512) == [Window(0, 1024, 1), Window(512, 1030, 1024)]
    assert sliding_windows(1024, 1024, 512) == [Window(0, 1024, 1)]


def test_a_1030_token_record_is_cut_to_its_1024_tokens_and_scored_like_upstream(judge, tmp_path):
    text = _text(1029)  # one judge token per character: 1030 ids with BOS
    record = Record(id=0, tokens=[BOS] * 1024, confidence=[1.0] * 1024, prompt_len=1, text=text)
    record.stages = [{"kind": "draft", "length": 1024}]
    path = tmp_path / "long.jsonl"
    path.write_text(record.to_json() + "\n")
    samples = read_samples(path)
    assert samples[0].max_tokens == 1024

    result = score_samples(samples, judge, EvalSettings(context=CONTEXT, stride=STRIDE)).samples[0]
    ids = [BOS, *judge.encode(text)]
    assert len(ids) == 1030
    expected_nll, expected_count = _upstream_style_nll(judge, ids[:1024])
    assert result.tokens == 1023 and result.truncated == 6 and result.scored_tokens == expected_count
    assert result.nll_sum == pytest.approx(expected_nll, abs=1e-3)
    assert result.entropy == pytest.approx(_entropy(ids[:1024]), abs=1e-12)

    # The cut matters: the uncut sample gives another number (and scores 6 more tokens).
    everything = score_samples(samples, judge, EvalSettings(context=CONTEXT, stride=STRIDE, max_tokens=0)).samples[0]
    assert everything.scored_tokens == 1029 and everything.truncated == 0
    assert everything.nll_sum == pytest.approx(_upstream_style_nll(judge, ids)[0], abs=1e-3)


def test_plain_text_is_cut_at_1024_unless_told_otherwise(judge):
    text = _text(1100, seed=1)
    settings = dict(context=CONTEXT, stride=STRIDE)
    default = score_samples([text], judge, EvalSettings(**settings)).samples[0]
    assert default.tokens == 1023 and default.truncated == 1101 - 1024
    short = score_samples([Sample(text, max_tokens=1024)], judge, EvalSettings(max_tokens=100, **settings)).samples[0]
    assert short.tokens == 99 and short.truncated == 1001
    assert short.nll_sum == pytest.approx(_upstream_style_nll(judge, [BOS, *judge.encode(text)][:100])[0], abs=1e-3)


def test_a_record_without_a_stage_length_uses_its_token_count(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(Record(id=1, tokens=[BOS, 0, 1], confidence=[1.0] * 3, prompt_len=1, text="ab").to_json() + "\n")
    assert read_samples(path)[0].max_tokens == 3


def test_clean_up_spaces_scores_the_text_paper_era_decoding_would_give(judge, judge_folder, tmp_path):
    spaced = "it is n't here , he said ."
    cleaned = "it isn't here, he said."
    on = score_samples([spaced], judge, EvalSettings(clean_up_spaces=True)).samples[0]
    plain = score_samples([cleaned], judge).samples[0]
    off = score_samples([spaced], judge).samples[0]
    assert on.nll_sum == pytest.approx(plain.nll_sum, abs=1e-9) and on.tokens == len(cleaned)
    assert off.tokens == len(spaced)

    path = tmp_path / "t.txt"
    path.write_text(spaced + "\n")
    settings = eval_ppl([path], judge, EvalSettings(clean_up_spaces=True)).settings
    assert settings["clean_up_tokenization_spaces"] is True and settings["max_tokens"] is None


def test_negative_max_tokens_is_a_usage_error():
    with pytest.raises(UsageError, match="max-tokens"):
        EvalSettings(max_tokens=-1)

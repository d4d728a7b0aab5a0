"""CLI wiring of the upstream-fidelity options: --var-length, --reject-entropy, --max-tries, over-long --length."""

import json
import math
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from did_cli.checkpoints import save_model
from did_cli.cli import app
from tests.bd3lm_reference import bd3lm_var_length
from tests.conftest import make_tiny_model

runner = CliRunner()
EOS = 67  # the character tokenizer's <|endoftext|>


def _lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _save_fixed(folder, char_tokenizer, probs: dict[int, float], length: int):
    """A checkpoint whose denoiser draws from `probs` wherever it is asked, whatever the context."""
    model = make_tiny_model(dropout=0.0, model_length=length)
    bias = torch.full((model.config.vocab_size,), -1e4)
    for token, p in probs.items():
        bias[token] = math.log(p)
    with torch.no_grad():
        model.backbone.output_layer.linear.weight.zero_()
        model.backbone.output_layer.linear.bias.copy_(bias)
    save_model(model, folder, char_tokenizer)
    return folder


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory, char_tokenizer):
    """32 tokens of 'a' (p = 0.85) or <|endoftext|> (p = 0.15): shorter than BD3-LM's 256-token stop window."""
    return _save_fixed(tmp_path_factory.mktemp("eos") / "eos", char_tokenizer, {0: 0.85, EOS: 0.15}, 32)


@pytest.fixture(scope="module")
def long_eos_checkpoint(tmp_path_factory, char_tokenizer):
    """264 tokens, each one of 62 characters (p = 0.996 / 62) or <|endoftext|> (p = 0.004).

    A 256-token window of such text has about 4.01 nats of unigram entropy, so BD3-LM's bar of 4 cuts some samples
    and not others; about a third of the samples hold no EOS before the first check (token 260).
    """
    probs = {token: 0.996 / 62 for token in range(62)}
    return _save_fixed(tmp_path_factory.mktemp("long") / "long", char_tokenizer, {**probs, EOS: 0.004}, 264)


def _kind(kept: int, full: list[int]) -> str:
    """How a variable-length sample ended: whole, at its first generated EOS, or cut by low entropy (after an EOS)."""
    eos = full.index(EOS, 1) if EOS in full[1:] else None
    if kept == len(full):
        return "whole"
    if eos is not None and kept == eos + 1:
        return "eos"
    return "entropy after an early eos" if eos is not None and eos < 256 else "entropy"


def test_var_length_records_are_bd3lms_cut_of_the_fixed_length_draws(long_eos_checkpoint):
    args = ["draft", "-m", str(long_eos_checkpoint), "-n", "12", "--batch-size", "4", "--top-p", "1"]
    fixed = _lines(runner.invoke(app, [*args, "--reject-entropy", "0"]).stdout)  # first draws, none redrawn
    result = runner.invoke(app, [*args, "--var-length"])
    assert result.exit_code == 0, result.stderr
    varlen = _lines(result.stdout)
    kinds = Counter()
    for full, record in zip(fixed, varlen, strict=True):
        expected = bd3lm_var_length(full["tokens"], 4, EOS)  # upstream's window (256) and bar (4 nats)
        assert len(record["tokens"]) == len(record["confidence"]) == expected
        assert record["tokens"] == full["tokens"][:expected]
        assert record["text"].endswith("<|endoftext|>") == (record["tokens"][-1] == EOS)
        stage = record["stages"][0]
        assert stage["var_length"] is True and stage["tries"] == 1 and stage["length"] == 264
        kinds[_kind(expected, full["tokens"])] += 1
    assert set(kinds) == {"whole", "eos", "entropy", "entropy after an early eos"}, kinds
    assert "note:" not in result.stderr


def test_var_length_below_the_window_cuts_nothing_and_says_so(eos_checkpoint):
    args = ["draft", "-m", str(eos_checkpoint), "-n", "4", "--top-p", "1"]
    fixed = _lines(runner.invoke(app, args).stdout)
    result = runner.invoke(app, [*args, "--var-length"])
    assert result.exit_code == 0, result.stderr
    assert [r["tokens"] for r in _lines(result.stdout)] == [r["tokens"] for r in fixed]
    assert any(EOS in r["tokens"][1:] for r in fixed)
    assert result.stderr.count("note: --var-length cuts no sample at --length 32") == 1


def test_draft_records_the_stop_settings_and_tries(tiny_checkpoint):
    result = runner.invoke(
        app, ["draft", "-m", str(tiny_checkpoint), "--reject-entropy", "3.5", "--max-tries", "4", "-q"]
    )
    assert result.exit_code == 0, result.stderr
    stage = _lines(result.stdout)[0]["stages"][0]
    assert stage["reject_entropy"] == 3.5 and stage["max_tries"] == 4 and stage["tries"] == 1


def test_bad_stop_options_and_over_long_lengths_fail_in_one_line(tiny_checkpoint):
    model = str(tiny_checkpoint)
    cases = [
        (["draft", "-m", model, "--max-tries", "0"], "--max-tries"),
        (["draft", "-m", model, "--reject-entropy", "-1"], "reject_entropy"),
        (["draft", "-m", model, "--reject-entropy", "inf"], "reject_entropy must be a finite number"),
        (["draft", "-m", model, "--length", "64"], "not supported"),
        (["generate", "-m", model, "--stages", "4,16", "--var-length"], "global refine stages"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_generate_with_var_length_refines_each_sample_at_its_own_length(long_eos_checkpoint):
    # The draft's terminating EOS has the lowest confidence (p = 0.004): snapshot remasking would take it first.
    args = ["generate", "-m", str(long_eos_checkpoint), "-n", "6", "--batch-size", "3", "--top-p", "1", "--var-length"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    records = _lines(result.stdout)
    assert len({len(r["tokens"]) for r in records}) > 1
    ended = 0
    for record in records:
        draft_tokens = record["draft_tokens"]
        assert len(record["tokens"]) == len(draft_tokens) == len(record["confidence"])
        refine = record["stages"][1]
        assert refine["kind"] == "refine" and refine["block_size"] == len(draft_tokens)
        if draft_tokens[-1] == EOS:
            ended += 1
            assert record["tokens"][-1] == EOS and len(draft_tokens) - 1 not in refine["remasked"]
            assert record["text"].endswith("<|endoftext|>")
    assert ended >= 2


def test_refine_of_var_length_records_never_remasks_their_terminating_eos(long_eos_checkpoint, tmp_path):
    drafts = tmp_path / "drafts.jsonl"
    args = ["draft", "-m", str(long_eos_checkpoint), "-n", "6", "--top-p", "1", "--var-length", "--out", str(drafts)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["refine", str(drafts), "--gamma", "1", "--top-p", "1", "-q"])
    assert result.exit_code == 0, result.stderr
    ended = 0
    for draft, refined in zip(_lines(drafts.read_text()), _lines(result.stdout), strict=True):
        last = len(draft["tokens"]) - 1
        keeps_eos = draft["tokens"][-1] == EOS
        expected = list(range(1, last)) if keeps_eos else list(range(1, last + 1))  # every other generated token
        assert refined["stages"][1]["remasked"] == expected
        assert (refined["tokens"][-1] == EOS) >= keeps_eos
        ended += keeps_eos
    assert ended >= 2


def test_eval_ppl_records_the_cut_and_the_space_clean_up(tmp_path):
    from tests.evaluation.tiny_judge import save_tiny_judge

    judge = str(save_tiny_judge(tmp_path / "judge"))
    (tmp_path / "s.txt").write_text("it is n't here , he said .\n")
    report = tmp_path / "r.json"
    args = ["eval-ppl", str(tmp_path / "s.txt"), "--judge", judge, "--json", str(report), "-q"]
    result = runner.invoke(app, [*args, "--max-tokens", "12", "--clean-up-spaces"])
    assert result.exit_code == 0, result.stderr
    body = json.loads(report.read_text())
    assert body["settings"]["max_tokens"] == 12 and body["settings"]["clean_up_tokenization_spaces"] is True
    assert body["files"][str(tmp_path / "s.txt")]["mean_tokens"] == 11  # 12 ids with BOS
    bad = runner.invoke(app, [*args, "--max-tokens", "-1"])
    assert bad.exit_code == 2 and "--max-tokens" in bad.stderr

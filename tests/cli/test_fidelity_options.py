"""CLI wiring of the upstream-fidelity options: --var-length, --reject-entropy, --max-tries, over-long --length."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from did_cli.checkpoints import save_model
from did_cli.cli import app
from tests.conftest import make_tiny_model

runner = CliRunner()
EOS = 67  # the character tokenizer's <|endoftext|>


def _lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory, char_tokenizer):
    """A checkpoint whose denoiser writes 'a' (p = 0.85) or <|endoftext|> (p = 0.15) wherever it is asked."""
    model = make_tiny_model(dropout=0.0)
    bias = torch.full((model.config.vocab_size,), -1e4)
    bias[0], bias[EOS] = math.log(0.85), math.log(0.15)
    with torch.no_grad():
        model.backbone.output_layer.linear.weight.zero_()
        model.backbone.output_layer.linear.bias.copy_(bias)
    folder = tmp_path_factory.mktemp("eos") / "eos"
    save_model(model, folder, char_tokenizer)
    return folder


def test_var_length_records_end_at_their_first_generated_eos(eos_checkpoint):
    model = str(eos_checkpoint)
    fixed = _lines(runner.invoke(app, ["draft", "-m", model, "-n", "12", "--batch-size", "4", "--top-p", "1"]).stdout)
    result = runner.invoke(app, ["draft", "-m", model, "-n", "12", "--batch-size", "4", "--top-p", "1", "--var-length"])
    assert result.exit_code == 0, result.stderr
    varlen = _lines(result.stdout)
    shortened = 0
    for full, record in zip(fixed, varlen, strict=True):
        generated = full["tokens"][1:]
        expected = 1 + generated.index(EOS) + 1 if EOS in generated else 32
        assert len(record["tokens"]) == len(record["confidence"]) == expected
        assert record["tokens"] == full["tokens"][:expected]
        assert record["text"].endswith("<|endoftext|>") == (expected < 32 or generated[-1] == EOS)
        stage = record["stages"][0]
        assert stage["var_length"] is True and stage["tries"] == 1 and stage["length"] == 32
        shortened += expected < 32
    assert shortened > 0


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


def test_generate_with_var_length_refines_each_sample_at_its_own_length(eos_checkpoint):
    args = ["generate", "-m", str(eos_checkpoint), "-n", "6", "--batch-size", "3", "--top-p", "1", "--var-length"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    records = _lines(result.stdout)
    assert len({len(r["tokens"]) for r in records}) > 1
    for record in records:
        draft_tokens = record["draft_tokens"]
        assert len(record["tokens"]) == len(draft_tokens) == len(record["confidence"])
        assert record["stages"][1]["kind"] == "refine" and record["stages"][1]["block_size"] == len(draft_tokens)


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

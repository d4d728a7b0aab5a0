import json

import pytest
from typer.testing import CliRunner

from did_cli.cli import app

runner = CliRunner()


def _records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("command", ["draft", "refine", "generate"])
def test_sampling_commands_offer_the_cache_dtype(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--kv-cache-dtype" in result.stdout


def test_stages_record_the_cache_dtype_that_ran_them(tiny_checkpoint, tmp_path):
    drafts = tmp_path / "d.jsonl"
    args = ["draft", "-m", str(tiny_checkpoint), "-n", "2", "--kv-cache-dtype", "bfloat16", "--out", str(drafts)]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["refine", str(drafts), "--block-size", "8"])
    assert result.exit_code == 0, result.stderr
    draft_stage, refine_stage = _records(result.stdout)[0]["stages"]
    assert (draft_stage["dtype"], draft_stage["kv_cache_dtype"]) == ("float32", "bfloat16")
    assert (refine_stage["dtype"], refine_stage["kv_cache_dtype"]) == ("float32", "float32")


def test_generate_with_a_bf16_cache_repeats_exactly(tiny_checkpoint):
    args = ["generate", "-m", str(tiny_checkpoint), "-n", "3", "--batch-size", "3", "--kv-cache-dtype", "bfloat16"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    one, two = _records(first.stdout), _records(second.stdout)
    assert [(r["tokens"], r["confidence"], r["draft_tokens"]) for r in one] == [
        (r["tokens"], r["confidence"], r["draft_tokens"]) for r in two
    ]
    assert all(stage["kv_cache_dtype"] == "bfloat16" for r in one for stage in r["stages"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-cache-dtype", "bfloat16", "--no-kv-cache"], "has no effect with --no-kv-cache"),
        (["--kv-cache-dtype", "float32", "--dtype", "bfloat16"], "needs float32 weights"),
        (["--kv-cache-dtype", "int8"], "use float32 or bfloat16"),
    ],
)
def test_bad_cache_dtype_combinations_fail_in_one_line(tiny_checkpoint, flags, message):
    result = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), *flags])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr


def test_resume_refuses_samples_made_with_another_cache_dtype(tiny_checkpoint, tmp_path):
    out = str(tmp_path / "o.jsonl")
    base = ["draft", "-m", str(tiny_checkpoint), "--out", out]
    assert runner.invoke(app, [*base, "-n", "1", "--kv-cache-dtype", "bfloat16"]).exit_code == 0
    result = runner.invoke(app, [*base, "-n", "2", "--resume"])
    assert result.exit_code != 0 and "made with kv_cache_dtype bfloat16, this run uses float32" in result.stderr
    weights = runner.invoke(app, [*base, "-n", "2", "--resume", "--dtype", "bfloat16"])
    assert weights.exit_code != 0 and "made with dtype float32, this run uses bfloat16" in weights.stderr
    resumed = runner.invoke(app, [*base, "-n", "2", "--resume", "--kv-cache-dtype", "bfloat16"])
    assert resumed.exit_code == 0, resumed.stderr

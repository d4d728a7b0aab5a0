"""The speed flags of the sampling commands: same samples, one-line refusals."""

import json

import pytest
from typer.testing import CliRunner

from did_cli.cli import app

runner = CliRunner()


def _tokens(text: str) -> list[list[int]]:
    return [json.loads(line)["tokens"] for line in text.splitlines() if line.strip()]


def test_flex_attention_draft_writes_the_same_samples(tiny_checkpoint):
    base = ["draft", "-m", str(tiny_checkpoint), "-n", "2", "--no-kv-cache", "--seed", "2"]
    sdpa = runner.invoke(app, [*base, "--attn-backend", "sdpa"])
    flex = runner.invoke(app, [*base, "--attn-backend", "flex"])
    assert sdpa.exit_code == 0 and flex.exit_code == 0, flex.stderr
    assert _tokens(flex.stdout) == _tokens(sdpa.stdout)


@pytest.mark.parametrize("command", ["draft", "generate"])
def test_cuda_graphs_are_refused_on_cpu_in_one_line(tiny_checkpoint, command):
    result = runner.invoke(app, [command, "-m", str(tiny_checkpoint), "--device", "cpu", "--cuda-graphs"])
    assert result.exit_code == 2
    assert "--cuda-graphs needs a CUDA device" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_attention_backend_is_refused_in_one_line(tiny_checkpoint):
    result = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "--attn-backend", "xformers"])
    assert result.exit_code == 2 and "--attn-backend must be one of" in result.stderr


@pytest.mark.parametrize("command", ["draft", "refine", "generate", "finetune"])
def test_help_lists_the_speed_flags(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    for flag in ("--attn-backend", "--compile"):
        assert flag in result.stdout
    assert ("--gradient-checkpointing" if command == "finetune" else "--cuda-graphs") in result.stdout

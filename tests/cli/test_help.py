"""`--help` of every command: what each flag takes, in words a user reads, and every default shown."""

import re

import pytest
from typer.testing import CliRunner

from did_cli.cli import app

runner = CliRunner()
COMMANDS = ["draft", "refine", "generate", "finetune", "show", "eval-ppl", "eval-nll", "sweep"]


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.stderr
    return result.stdout


def _flag_row(text: str, flag: str) -> str:
    return next(line for line in text.splitlines() if re.search(rf"│\s+(\*\s+)?{flag}\s", line))


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_no_python_types_and_no_value_for_switches(command):
    text = _help(*([command] if command else []))
    assert "<bool>" not in text and "list[" not in text and "{" not in text, text
    for switch in ("--help", *(["--quiet"] if command not in ("", "show") else [])):
        assert re.search(rf"{switch}\s+(-\w\s+)?[A-Z]", _flag_row(text, switch)), _flag_row(text, switch)


@pytest.mark.parametrize(
    "command,usage,row",
    [
        ("show", "show [OPTIONS] FILE", "FILE"),
        ("refine", "refine [OPTIONS] [INPUT]", "INPUT"),
        ("eval-ppl", "eval-ppl [OPTIONS] FILES...", "FILES..."),
    ],
)
def test_arguments_are_named_as_placeholders(command, usage, row):
    text = _help(command)
    assert usage in text
    assert "<path>" in _flag_row(text, re.escape(row)) or "<str>" in _flag_row(text, re.escape(row))


@pytest.mark.parametrize("command,flag", [("eval-nll", "--model"), ("sweep", "--model"), ("finetune", "--report-to")])
def test_a_repeatable_option_shows_the_value_it_takes_once(command, flag):
    assert "<str>" in _flag_row(_help(command), flag)


@pytest.mark.parametrize("command", ["draft", "refine", "generate", "sweep"])
def test_every_sampling_command_shows_the_order_default_once(command):
    row = _flag_row(_help(command), "--order")
    assert row.count("[default: first-hitting, or steps with --steps-per-block]") == 1 and row.count("default") == 1


def test_bracketed_defaults_in_help_text_are_shown():
    assert "[default: did-tiny]" in _flag_row(_help("draft"), "--model")
    assert "pip install 'did[mauve]'" in _help("eval-ppl")

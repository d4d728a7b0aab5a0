import json

import pytest
from typer.testing import CliRunner

from did_cli.cli import app
from did_cli.errors import UsageError
from did_cli.sampling.remask import STRATEGIES
from did_cli.settings import REMASK_STRATEGIES, canonical_remask

runner = CliRunner()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("post-hoc", "posthoc"), ("Post-Hoc", "posthoc"), ("post_hoc", "posthoc"), ("posthoc", "posthoc"),
     ("SNAPSHOT", "snapshot"), (" random ", "random")],
)  # fmt: skip
def test_spellings_map_to_the_strategy_names(name, expected):
    assert canonical_remask(name) == expected and expected in STRATEGIES


def test_the_sampler_has_a_score_function_for_every_strategy_name():
    assert tuple(STRATEGIES) == REMASK_STRATEGIES


def test_an_unknown_strategy_lists_the_choices():
    with pytest.raises(UsageError, match=r"unknown remask strategy 'best'; choose one of snapshot, posthoc, random, "):
        canonical_remask("best")


@pytest.mark.parametrize("command", ["refine", "generate"])
def test_commands_accept_post_hoc_and_record_posthoc(command, tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    if command == "refine":
        drafts = tmp_path / "drafts.jsonl"
        assert runner.invoke(app, ["draft", "-m", model, "-n", "1", "--out", str(drafts), "-q"]).exit_code == 0
        args = ["refine", str(drafts)]
    else:
        args = ["generate", "-n", "1"]
    result = runner.invoke(app, [*args, "-m", model, "--remask", "post-hoc", "-q"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["stages"][-1]["remask"] == "posthoc"

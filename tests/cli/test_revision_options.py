"""Revision from the command line: every remask strategy, editing, and notes where a setting cannot act as written."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from did_cli.cli import app

runner = CliRunner()
TIMING = ("seconds", "batch_size", "model_calls", "cache_calls")


def _records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        for stage in record["stages"]:
            for key in TIMING:
                stage.pop(key, None)
    return records


@pytest.fixture
def drafts(tiny_checkpoint, tmp_path):
    path = tmp_path / "drafts.jsonl"
    result = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "3", "-q", "--out", str(path)])
    assert result.exit_code == 0, result.stderr
    return path


@pytest.mark.parametrize(
    ("remask", "extra", "scoring_calls"),
    [("snapshot-entropy", [], 0), ("snapshot-margin", [], 0), ("energy", [], 1), ("mc-dropout", ["--passes", "2"], 2),
     ("mc-variance", ["--passes", "2"], 2), ("noise-ensemble", ["--passes", "3", "--ensemble-ratio", "0.3"], 3)],
)  # fmt: skip
def test_every_strategy_refines_and_records_what_it_used(drafts, tmp_path, remask, extra, scoring_calls):
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["refine", str(drafts), "--remask", remask, *extra, "-q", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    for record, draft in zip(_records(out), _records(drafts), strict=True):
        stage = record["stages"][-1]
        assert stage["kind"] == "refine" and stage["remask"] == remask and len(stage["remasked"]) == 16
        assert stage["nfes"] >= 16 + scoring_calls
        kept = [i for i in range(len(record["tokens"])) if i not in stage["remasked"]]
        assert all(record["tokens"][i] == draft["tokens"][i] for i in kept)
        assert len(record["entropy"]) == len(record["margin"]) == len(record["tokens"])


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--passes", "4"], "--passes does not apply to --remask snapshot"),
     (["--remask", "mc-dropout", "--ensemble-ratio", "0.2"], "--ensemble-ratio does not apply to --remask mc-dropout"),
     (["--edit-threshold", "0.5", "--gamma", "0.3"], "--gamma applies to remasking"),
     (["--edit-passes", "2"], "--edit-passes applies to --edit-threshold"),
     (["--edit-threshold", "1.5"], "--edit-threshold must be in [0, 1]"),
     (["--edit-threshold", "0.5", "--edit-candidate", "best"], "--edit-candidate must be argmax or sampled")],
)  # fmt: skip
def test_flags_a_stage_would_ignore_are_refused_in_one_line(drafts, args, message):
    result = runner.invoke(app, ["refine", str(drafts), *args])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_editing_replaces_tokens_in_place_and_a_threshold_of_one_changes_nothing(drafts, tmp_path):
    out = tmp_path / "e.jsonl"
    result = runner.invoke(app, ["refine", str(drafts), "--edit-threshold", "0.05", "-q", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    edited = _records(out)
    assert any(record["stages"][-1]["edited"] for record in edited)
    for record, draft in zip(edited, _records(drafts), strict=True):
        stage = record["stages"][-1]
        assert stage["kind"] == "edit" and "remasked" not in stage
        changed = [i for i, (a, b) in enumerate(zip(record["tokens"], draft["tokens"], strict=True)) if a != b]
        assert set(changed) <= set(stage["edited"]) and 0 not in stage["edited"]
        assert stage["previous_tokens"] == [draft["tokens"][i] for i in stage["edited"]]
    unchanged = tmp_path / "u.jsonl"
    assert (
        runner.invoke(app, ["refine", str(drafts), "--edit-threshold", "1", "-q", "--out", str(unchanged)]).exit_code
        == 0
    )
    assert [r["tokens"] for r in _records(unchanged)] == [r["tokens"] for r in _records(drafts)]


def test_generate_with_an_editing_stage_equals_draft_then_refine_with_edit_threshold(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    common = ["-m", model, "-n", "3", "-q"]
    assert runner.invoke(app, ["draft", *common, "--out", str(tmp_path / "d.jsonl")]).exit_code == 0
    refine = ["refine", "-q", "--gamma", "0.25"]
    assert runner.invoke(app, [*refine, str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "r.jsonl")]).exit_code == 0
    edit = ["refine", "-q", "--edit-threshold", "0.05", "--edit-passes", "2"]
    assert runner.invoke(app, [*edit, str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "piped.jsonl")]).exit_code == 0
    args = ["generate", *common, "--gamma", "0.25", "--edit-threshold", "0.05", "--edit-passes", "2"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "g.jsonl")]).exit_code == 0
    generated, piped = _records(tmp_path / "g.jsonl"), _records(tmp_path / "piped.jsonl")
    for record in generated + piped:
        record.pop("versions")
        for stage in record["stages"]:
            stage.pop("processes", None)
    assert generated == piped
    only_edit = ["generate", *common, "--stages", "4", "--edit-threshold", "0.05", "--out", str(tmp_path / "o.jsonl")]
    assert runner.invoke(app, only_edit).exit_code == 0
    assert [s["kind"] for s in _records(tmp_path / "o.jsonl")[0]["stages"]] == ["draft", "edit"]


def test_an_edited_output_resumes_only_with_the_same_edit_settings(drafts, tmp_path):
    out = tmp_path / "e.jsonl"
    args = ["refine", str(drafts), "-q", "--out", str(out), "--edit-threshold", "0.05"]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, [*args, "--resume"]).exit_code == 0
    other = runner.invoke(app, [*args[:-1], "0.1", "--resume"])
    assert other.exit_code == 2 and "edit threshold=0.05, this run uses 0.1" in other.stderr


def test_settings_that_cannot_act_as_written_are_named_once(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    stages = runner.invoke(app, ["generate", "-m", model, "--stages", "4,1024", "--out", str(tmp_path / "g.jsonl")])
    assert stages.exit_code == 0
    assert stages.stderr.count("note: refine block size 1024 is longer than --length 32: one global block") == 1
    entropy = runner.invoke(app, ["draft", "-m", model, "--reject-entropy", "3", "--out", str(tmp_path / "d.jsonl")])
    assert entropy.exit_code == 0 and "note: --reject-entropy cannot act at --length 32" in entropy.stderr
    quiet_default = runner.invoke(app, ["draft", "-m", model, "-q", "--out", str(tmp_path / "q.jsonl")])
    assert "note:" not in quiet_default.stderr  # defaults are not the user's choice: nothing to say
    nll = runner.invoke(
        app,
        ["eval-nll", "-m", model, "--data", str(tmp_path / "d.jsonl"), "--block-size", "4,1024", "--num-samples", "2"],
    )
    assert nll.exit_code == 0, nll.stderr
    assert "note: block size 1024 is longer than the rows (32 tokens): one global block, B = 32" in nll.stderr

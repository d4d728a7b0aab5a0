"""--resume: a run killed at any moment and resumed ends with the records of an unbroken run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from did_cli.cli import app

runner = CliRunner()
DID = [sys.executable, "-m", "did_cli"]
TIMING = ("seconds", "batch_size", "model_calls", "cache_calls")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _comparable(path: Path) -> list[dict]:
    """Records without what legitimately differs between runs (wall-clock and batching)."""
    records = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for stage in record["stages"]:
            for key in TIMING:
                stage.pop(key, None)
        records.append(record)
    return records


@pytest.mark.parametrize("command", ["draft", "generate"])
def test_a_run_killed_midway_and_resumed_equals_an_unbroken_run(tiny_checkpoint, tmp_path, command):
    model = str(tiny_checkpoint)
    whole = tmp_path / "whole.jsonl"
    args = [command, "-m", model, "-n", "6", "--batch-size", "1", "-q"]
    assert runner.invoke(app, [*args, "--out", str(whole)]).exit_code == 0

    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([*DID, *args, "--out", str(out)], env=_env())
    partial = tmp_path / "out.jsonl.partial"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    with partial.open("a") as handle:  # what a kill in the middle of a write leaves
        handle.write('{"id": 5, "tokens": [0, 1')
    result = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert _comparable(out) == _comparable(whole)
    assert not partial.exists()


def test_refine_resume_skips_the_records_it_already_has(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    drafts = tmp_path / "d.jsonl"
    assert runner.invoke(app, ["draft", "-m", model, "-n", "4", "-q", "--out", str(drafts)]).exit_code == 0
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, ["refine", str(drafts), "-q", "--out", str(whole)]).exit_code == 0
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text("\n".join(whole.read_text().splitlines()[:2]) + "\n")
    result = runner.invoke(app, ["refine", str(drafts), "-q", "--out", str(tmp_path / "out.jsonl"), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert _comparable(tmp_path / "out.jsonl") == _comparable(whole)


def test_resume_with_other_settings_names_the_first_difference(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    out = tmp_path / "out.jsonl"
    assert runner.invoke(app, ["draft", "-m", model, "-n", "2", "-q", "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["draft", "-m", model, "-n", "4", "--top-p", "0.5", "--out", str(out), "--resume"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "top_p=0.9" in result.stderr and "0.5" in result.stderr
    assert len(out.read_text().splitlines()) == 2  # untouched


def test_resume_to_stdout_is_refused(tiny_checkpoint):
    result = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "--resume"])
    assert result.exit_code == 2 and "--resume needs --out" in result.stderr


def test_a_refused_resume_is_one_line_that_says_what_is_kept(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    out = tmp_path / "out.jsonl"
    assert runner.invoke(app, ["draft", "-m", model, "-n", "2", "-q", "--out", str(out)]).exit_code == 0
    out.rename(tmp_path / "out.jsonl.partial")  # what an interrupted run leaves
    result = runner.invoke(app, ["draft", "-m", model, "-n", "4", "--seed", "1", "--out", str(out), "--resume"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "cannot resume" in result.stderr and "2 finished samples are kept" in result.stderr

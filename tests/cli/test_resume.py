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


@pytest.mark.parametrize("batch_size", ["2", "3"])
@pytest.mark.parametrize("kept", [1, 4])
def test_refine_resume_equals_an_unbroken_run_bit_for_bit(tiny_checkpoint, tmp_path, batch_size, kept):
    """Interrupted after `kept` records (mid-batch or not), resumed at the same batch size: tokens and confidences
    of every record are the unbroken run's exactly, because the missing records are refined in the same batches."""
    model = str(tiny_checkpoint)
    drafts = tmp_path / "d.jsonl"
    assert runner.invoke(app, ["draft", "-m", model, "-n", "7", "-q", "--out", str(drafts)]).exit_code == 0
    whole = tmp_path / "whole.jsonl"
    args = ["refine", str(drafts), "-q", "--batch-size", batch_size]
    assert runner.invoke(app, [*args, "--out", str(whole)]).exit_code == 0
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text("\n".join(whole.read_text().splitlines()[:kept]) + "\n")
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out.jsonl"), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert _comparable(tmp_path / "out.jsonl") == _comparable(whole)


def test_a_resume_at_another_batch_size_keeps_the_tokens_and_confidences_to_rounding(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    args = ["draft", "-m", model, "-n", "5", "-q"]
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [*args, "--batch-size", "2", "--out", str(whole)]).exit_code == 0
    (tmp_path / "out.jsonl.partial").write_text("\n".join(whole.read_text().splitlines()[:3]) + "\n")
    result = runner.invoke(app, [*args, "--batch-size", "4", "--out", str(tmp_path / "out.jsonl"), "--resume"])
    assert result.exit_code == 0, result.stderr
    resumed, unbroken = _comparable(tmp_path / "out.jsonl"), _comparable(whole)
    assert [r["tokens"] for r in resumed] == [r["tokens"] for r in unbroken]
    for a, b in zip(resumed, unbroken, strict=True):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)  # batched matmuls sum in another order


def _finished(args: list[str], out: Path) -> None:
    result = runner.invoke(app, [*args, "-q", "--out", str(out)])
    assert result.exit_code == 0, result.stderr


def _refused(args: list[str], out: Path, message: str) -> None:
    before = out.read_bytes()
    result = runner.invoke(app, [*args, "--out", str(out), "--resume"])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "cannot resume: " in result.stderr and message in result.stderr
    assert out.read_bytes() == before  # nothing lost


def test_resume_with_another_prompt_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    _finished(["draft", "-m", str(tiny_checkpoint), "-n", "2", "--prompt", "abc"], out)
    _refused(
        ["draft", "-m", str(tiny_checkpoint), "-n", "2", "--prompt", "xyz"],
        out,
        "prompt 'abc', this run gives it 'xyz'",
    )


def test_resume_with_an_n_that_moves_a_prompt_to_another_id_is_refused(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\ncd\n")
    out = tmp_path / "out.jsonl"
    args = ["draft", "-m", str(tiny_checkpoint), "--prompt-file", str(prompts)]
    _finished([*args, "-n", "2"], out)
    _refused([*args, "-n", "3"], out, "sample 2 was made for the prompt 'cd', this run gives it 'ab'")


def test_resume_with_fewer_samples_than_finished_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    _finished(["draft", "-m", str(tiny_checkpoint), "-n", "4"], out)
    _refused(["draft", "-m", str(tiny_checkpoint), "-n", "2"], out, "sample 2 is not one of the 2 samples")


def test_resume_with_another_seed_or_model_is_refused(tiny_checkpoint, tmp_path, char_tokenizer):
    from did_cli.checkpoints import save_model
    from tests.conftest import make_tiny_model

    other = tmp_path / "other"
    save_model(make_tiny_model(seed=1, dropout=0.0), other, char_tokenizer)
    out = tmp_path / "out.jsonl"
    _finished(["draft", "-m", str(tiny_checkpoint), "-n", "2"], out)
    _refused(["draft", "-m", str(tiny_checkpoint), "-n", "2", "--seed", "1"], out, "made with seed 0, this run uses 1")
    _refused(["draft", "-m", str(other), "-n", "2"], out, "sample 0 was made by other weights")


def test_refine_resume_with_another_drafts_file_is_refused(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    first, second, out = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out.jsonl"
    _finished(["draft", "-m", model, "-n", "3"], first)
    _finished(["draft", "-m", model, "-n", "3", "--seed", "7"], second)
    _finished(["refine", str(first)], out)
    _refused(["refine", str(second)], out, "sample 0 was refined from another record than the input's sample 0")


@pytest.mark.parametrize(
    ("fixture", "args"),
    [
        ("draft-a48febc.jsonl.partial", ["draft", "-n", "2", "--length", "16", "--batch-size", "2", "--prompt-file"]),
        ("generate-a48febc.jsonl.partial", ["generate", "-n", "3", "--length", "16", "--batch-size", "2"]),
    ],
)
def test_a_record_file_written_before_the_redesign_still_resumes(tmp_path, fixture, args):
    """Partial files written by did at a48febc (embedded did-tiny) resume; the result is an unbroken run's."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    if args[-1] == "--prompt-file":
        args = [*args, str(fixtures / "prompts.txt")]
    kept = (fixtures / fixture).read_text()
    (tmp_path / "out.jsonl.partial").write_text(kept)
    result = runner.invoke(app, [*args, "-q", "--out", str(tmp_path / "out.jsonl"), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.jsonl").read_text().startswith(kept)  # kept records are carried over as written
    _finished(args, tmp_path / "whole.jsonl")
    resumed, unbroken = _comparable(tmp_path / "out.jsonl"), _comparable(tmp_path / "whole.jsonl")
    assert [r["tokens"] for r in resumed] == [r["tokens"] for r in unbroken]
    for a, b in zip(resumed, unbroken, strict=True):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)  # written on another CPU


def test_a_damaged_last_line_is_dropped_with_a_note_and_made_again(tiny_checkpoint, tmp_path):
    args = ["draft", "-m", str(tiny_checkpoint), "-n", "3", "--batch-size", "1"]
    whole = tmp_path / "whole.jsonl"
    _finished(args, whole)
    lines = whole.read_text().splitlines()
    (tmp_path / "out.jsonl.partial").write_text(lines[0] + "\n" + '{"id": 1, "tokens": [0], "confidence": [NaN]}\n')
    result = runner.invoke(app, [*args, "-q", "--out", str(tmp_path / "out.jsonl"), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("note: dropped line 2 of ") and "NaN" in result.stderr
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

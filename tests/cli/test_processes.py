"""Sampling on several processes (accelerate launch, torchrun; gloo on CPU) equals a one-process run."""

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
from did_cli.processes import Shard, interleave

runner = CliRunner()
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
ACCELERATE += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "did_cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "did_cli"]
INFORMATION = ("seconds", "batch_size", "model_calls", "cache_calls", "processes")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        for stage in record["stages"]:
            for key in INFORMATION:
                stage.pop(key, None)
    return records


def _assert_same(two: Path, one: Path) -> None:
    a, b = _records(two), _records(one)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"] and x["text"] == y["text"]
        assert x["confidence"] == pytest.approx(y["confidence"], abs=1e-6)
        for stage, other in zip(x["stages"], y["stages"], strict=True):
            # Confidences carried into a stage agree to float32 rounding across batch shapes, like `confidence`.
            close = stage.pop("previous_confidence", []) == pytest.approx(
                other.pop("previous_confidence", []), abs=1e-6
            )
            assert close and stage == other


def _launch(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300, env=_env())


def test_interleave_undoes_the_round_robin_split():
    items = list(range(7))
    parts = [[p for p in items if Shard(rank, 3).owns(p)] for rank in range(3)]
    assert interleave(parts) == items


def test_two_process_draft_with_accelerate_equals_one_process(tiny_checkpoint, tmp_path):
    args = ["draft", "-m", str(tiny_checkpoint), "-n", "5", "--batch-size", "2"]  # 2 does not divide 5
    done = _launch(ACCELERATE, [*args, "--out", str(tmp_path / "two.jsonl")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5 samples" in done.stderr and "on 2 processes" in done.stderr
    assert runner.invoke(app, [*args, "-q", "--out", str(tmp_path / "one.jsonl")]).exit_code == 0
    _assert_same(tmp_path / "two.jsonl", tmp_path / "one.jsonl")
    assert json.loads((tmp_path / "two.jsonl").read_text().splitlines()[0])["stages"][0]["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]  # parts merged and removed


def test_two_process_refine_and_generate_with_torchrun_equal_one_process(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    drafts = tmp_path / "drafts.jsonl"
    assert runner.invoke(app, ["draft", "-m", model, "-n", "3", "-q", "--out", str(drafts)]).exit_code == 0
    done = _launch(TORCHRUN, ["refine", str(drafts), "-q", "--out", str(tmp_path / "r2.jsonl")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert runner.invoke(app, ["refine", str(drafts), "-q", "--out", str(tmp_path / "r1.jsonl")]).exit_code == 0
    _assert_same(tmp_path / "r2.jsonl", tmp_path / "r1.jsonl")
    # More processes than samples: one process has nothing to do.
    args = ["generate", "-m", model, "-n", "1", "-q"]
    done = _launch(TORCHRUN, [*args, "--out", str(tmp_path / "g2.jsonl")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "g1.jsonl")]).exit_code == 0
    _assert_same(tmp_path / "g2.jsonl", tmp_path / "g1.jsonl")


def test_two_process_draft_killed_and_resumed_equals_an_unbroken_run(tiny_checkpoint, tmp_path):
    args = ["draft", "-m", str(tiny_checkpoint), "-n", "40", "--batch-size", "1", "-q"]
    out = tmp_path / "two.jsonl"
    process = subprocess.Popen(
        [*TORCHRUN, *args, "--out", str(out)], env=_env(), start_new_session=True, stderr=subprocess.DEVNULL
    )
    partials = [tmp_path / f"two.jsonl.part{rank}-of-2.partial" for rank in range(2)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(p.exists() and p.read_text().count("\n") >= 2 for p in partials):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    done = _launch(TORCHRUN, [*args, "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "one.jsonl")]).exit_code == 0
    _assert_same(out, tmp_path / "one.jsonl")


def test_several_processes_need_an_output_file(tiny_checkpoint):
    done = _launch(TORCHRUN, ["draft", "-m", str(tiny_checkpoint)])
    assert done.returncode != 0 and "pass --out FILE" in done.stderr


def test_two_process_eval_ppl_equals_one_process(tiny_checkpoint, tmp_path):
    samples = tmp_path / "samples.jsonl"
    assert (
        runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "5", "-q", "--out", str(samples)]).exit_code == 0
    )
    args = ["eval-ppl", str(samples), "--judge", "did-tiny-judge", "-q"]
    done = _launch(
        ACCELERATE, [*args, "--json", str(tmp_path / "two.json"), "--per-sample", str(tmp_path / "two.jsonl")]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    one = runner.invoke(app, [*args, "--json", str(tmp_path / "one.json"), "--per-sample", str(tmp_path / "one.jsonl")])
    assert one.exit_code == 0, one.stderr
    two_summary = json.loads((tmp_path / "two.json").read_text())["files"][str(samples)]
    one_summary = json.loads((tmp_path / "one.json").read_text())["files"][str(samples)]
    for key in ("gen_ppl", "gen_ppl_pooled", "entropy", "num_samples", "num_degenerate", "num_scored_tokens"):
        assert two_summary[key] == pytest.approx(one_summary[key], rel=1e-6), key
    two_lines = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    one_lines = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [line["id"] for line in two_lines] == [line["id"] for line in one_lines] == [0, 1, 2, 3, 4]


def test_two_process_sweep_writes_the_files_and_rows_of_one_process(tiny_checkpoint, tmp_path):
    from tests.cli.test_sweep import sweep_args
    from tests.evaluation.tiny_judge import save_tiny_judge

    judge = str(save_tiny_judge(tmp_path / "judge"))
    args = sweep_args(tiny_checkpoint, judge, tmp_path / "two", "--num-samples", "3", "-q")
    done = _launch(ACCELERATE, args)
    assert done.returncode == 0, done.stderr[-2000:]
    one = runner.invoke(app, sweep_args(tiny_checkpoint, judge, tmp_path / "one", "--num-samples", "3", "-q"))
    assert one.exit_code == 0, one.stderr
    rows = {}
    for name in ("one", "two"):
        rows[name] = [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows["two"]] == [r["variant"] for r in rows["one"]]
    for a, b in zip(rows["two"], rows["one"], strict=True):
        for key in ("gen_ppl", "gen_ppl_pooled", "entropy", "num_samples", "nfes"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    samples = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.jsonl") if p.parent.name)
    for path in samples:
        if path.name != "results.jsonl":
            _assert_same(tmp_path / "two" / path, tmp_path / "one" / path)


def test_two_process_resume_of_a_finished_out_keeps_every_record(tiny_checkpoint, tmp_path):
    """A requeued job (the README's SLURM script always passes --resume) redraws nothing of a finished OUT."""
    args = ["draft", "-m", str(tiny_checkpoint), "-n", "5", "--batch-size", "2"]
    out = tmp_path / "out.jsonl"
    assert runner.invoke(app, [*args, "-q", "--out", str(out)]).exit_code == 0
    before = out.read_bytes()
    done = _launch(TORCHRUN, [*args, "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "0 samples" in done.stderr and "(5 kept from the interrupted run) on 2 processes" in done.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_part_files_of_another_process_count_are_refused_by_name(tiny_checkpoint, tmp_path):
    args = ["draft", "-m", str(tiny_checkpoint), "-n", "4", "--out", str(tmp_path / "out.jsonl")]
    first = runner.invoke(app, [*args, "-q"])
    assert first.exit_code == 0
    (tmp_path / "out.jsonl").rename(tmp_path / "out.jsonl.partial")  # what a killed one-process run leaves
    done = _launch(TORCHRUN, [*args, "--resume"])
    assert done.returncode != 0
    assert "cannot resume: out.jsonl.partial was written by a one-process run, this run has 2" in done.stderr
    assert "resume it with 1 process" in done.stderr
    # And the other way round: a one-process resume of a two-process run's parts.
    lines = (tmp_path / "out.jsonl.partial").read_text().splitlines(keepends=True)
    (tmp_path / "out.jsonl.partial").unlink()
    (tmp_path / "out.jsonl.part0-of-2.partial").write_text(lines[0] + lines[2])
    (tmp_path / "out.jsonl.part1-of-2.partial").write_text(lines[1])
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "out.jsonl.part0-of-2.partial, out.jsonl.part1-of-2.partial were written by a 2-process run" in result.stderr
    fresh = runner.invoke(app, args)
    assert fresh.exit_code != 0 and "hold finished samples of a 2-process run" in fresh.stderr

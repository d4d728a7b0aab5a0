import json

import pytest
from typer.testing import CliRunner

from did_cli.cli import app
from tests.evaluation.tiny_judge import save_tiny_judge

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    return str(save_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny-judge"))


def sweep_args(checkpoint, judge, out, *extra):
    return [
        "sweep",
        "--model",
        f"tiny={checkpoint}",
        "--judge",
        judge,
        "--num-samples",
        "2",
        "--length",
        "32",
        "--remask",
        "snapshot,random",
        "--gamma",
        "0.5",
        "--refine-block-size",
        "1024",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def test_help_describes_the_options():
    result = runner.invoke(app, ["sweep", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--judge", "--remask", "--gamma", "--refine-block-size", "--grid", "--out", "--quiet"):
        assert option in result.stdout
    assert "sweep" in runner.invoke(app, ["--help"]).stdout


def test_a_two_variant_sweep_writes_results_report_and_plots_then_resumes(tiny_checkpoint, judge_folder, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, sweep_args(tiny_checkpoint, judge_folder, out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "3 results (3 scored now, 0 reused" in result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # B2 1024 >= L = 32 is one global block.
    assert [r["variant"] for r in rows] == ["draft", "snapshot-g0.5-b32", "random-g0.5-b32"]
    report = (out / "report.md").read_text()
    assert "### Remask strategy (γ = 0.5, B2 = L = 32)" in report and "### NFEs against gen PPL" in report
    for plot in ("gamma_curve.png", "nfe_pareto.png"):
        assert (out / plot).read_bytes()[:8] == PNG

    stamps = {f: f.stat().st_mtime_ns for f in (out / "tiny").rglob("*.jsonl")}
    assert len(stamps) == 3
    again = runner.invoke(app, sweep_args(tiny_checkpoint, judge_folder, out))
    assert again.exit_code == 0, again.stderr
    assert "0 scored now, 3 reused; sampled files: 0 draft, 0 refined)" in again.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    assert {f: f.stat().st_mtime_ns for f in (out / "tiny").rglob("*.jsonl")} == stamps


def test_quiet_prints_nothing(tiny_checkpoint, judge_folder, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, sweep_args(tiny_checkpoint, judge_folder, out, "--gamma", "1.0", "-q"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert (out / "report.md").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gamma", "0.5,abc"], "--gamma must be a comma-separated list"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
        (["--remask", "snapshot,best"], "unknown remask strategy 'best'"),
        (["--refine-block-size", "12"], "--refine-block-size 12 does not divide the length 32"),
        (["--length", "64"], "exceeds the length 32"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, judge_folder, tmp_path, extra, message):
    result = runner.invoke(app, sweep_args(tiny_checkpoint, judge_folder, tmp_path / "out", *extra))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_no_model_is_one_line_and_exit_2(tmp_path):
    result = runner.invoke(app, ["sweep", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: give at least one --model"


STAGE_OPTIONS = ("--top-p", "--order", "--temperature", "--tokens-per-call", "--steps-per-block", "--no-kv-cache")


def test_help_lists_the_stage_options_of_the_other_sampling_commands():
    result = runner.invoke(app, ["sweep", "--help"], env={"COLUMNS": "200"})
    assert all(option in result.stdout for option in STAGE_OPTIONS)


def test_stage_options_reach_every_sample_and_row(tiny_checkpoint, judge_folder, tmp_path):
    out = tmp_path / "out"
    extra = ["--remask", "post-hoc", "--order", "confidence", "--tokens-per-call", "2", "--top-p", "0.8"]
    extra += ["--temperature", "0.9", "--no-kv-cache", "-q"]
    result = runner.invoke(app, sweep_args(tiny_checkpoint, judge_folder, out, *extra))
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["draft", "posthoc-g0.5-b32"]
    unmasking = {"order": "confidence", "steps_per_block": None, "tokens_per_call": 2, "top_p": 0.8, "temperature": 0.9}
    for row in rows:
        assert row["config"]["unmasking"] == unmasking and row["config"]["kv_cache"] is False
        for line in (out / row["file"]).read_text().splitlines():
            for stage in json.loads(line)["stages"]:
                assert {key: stage[key] for key in unmasking} == unmasking and stage["kv_cache"] is False
    # A draft at 2 tokens per call takes half the calls of one token per call (31 generated tokens: 16 calls).
    assert rows[0]["draft_nfes"] == 16


def test_a_judge_that_cannot_load_fails_before_any_drafting(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, sweep_args(tiny_checkpoint, "did-tests/no-such-judge", out))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no-such-judge" in result.stderr
    assert not list(tmp_path.rglob("*.jsonl"))


def test_steps_per_block_alone_implies_the_steps_order_as_in_draft(monkeypatch, tmp_path):
    seen = {}

    def fake_sweep(settings, on_event, processes):
        seen["unmasking"] = settings.unmasking
        raise SystemExit(0)

    monkeypatch.setattr("did_cli.ablation.run.run_sweep", fake_sweep)
    runner.invoke(app, ["sweep", "-m", "x", "--steps-per-block", "2", "--out", str(tmp_path / "out"), "-q"])
    assert seen["unmasking"].order == "steps" and seen["unmasking"].steps_per_block == 2


def test_a_full_disk_during_a_sweep_names_the_file_and_says_to_run_it_again(
    tiny_checkpoint, judge_folder, tmp_path, monkeypatch
):
    import errno
    import os

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("did_cli.record_files.os.write", full)
    out = tmp_path / "out"
    result = runner.invoke(app, sweep_args(tiny_checkpoint, judge_folder, out, "-q"))
    assert result.exit_code != 0 and result.stderr.count("\n") == 1, result.stderr
    assert str(out) in result.stderr and "No space left on device" in result.stderr
    assert "run the same command again" in result.stderr and "--resume" not in result.stderr
    assert os.path.isdir(out)


def test_a_full_disk_while_appending_a_result_names_the_file_and_keeps_earlier_rows(tmp_path, monkeypatch):
    import errno

    from did_cli.ablation import results
    from did_cli.errors import OutputError

    path = tmp_path / "results.jsonl"
    results.append_result(path, {"model": "a"})
    real_open = open

    class Full:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results, "open", Full, raising=False)
    with pytest.raises(OutputError, match="cannot append to .*results.jsonl: No space left on device") as info:
        results.append_result(path, {"model": "b" * 100})
    assert "run the same command again" in str(info.value)
    assert results.read_results(path) == [{"model": "a"}] and path.read_text().endswith("\n")

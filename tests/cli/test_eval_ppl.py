import importlib
import json
import math
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from did_cli.cli import app
from tests.evaluation.tiny_judge import save_tiny_judge

runner = CliRunner()
SUMMARY_KEYS = {"gen_ppl", "gen_ppl_pooled", "entropy", "num_samples", "num_degenerate", "mean_tokens"}


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    return str(save_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny-judge"))


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    # Short relative names, so the table on stderr shows them unwrapped.
    monkeypatch.chdir(tmp_path)
    records = [{"id": i, "text": text, "prompt": None} for i, text in enumerate(["the cat sat.", "a dog ran far."])]
    (tmp_path / "draft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "refined.txt").write_text("the cat sat on the mat.\nhello there\naaaaaaaaaa\n")
    return ["draft.jsonl", "refined.txt"]


def test_help_describes_the_options():
    result = runner.invoke(app, ["eval-ppl", "--help"])
    assert result.exit_code == 0
    for option in ("--judge", "--batch-size", "--json", "--per-sample", "--degenerate-entropy", "--stride"):
        assert option in result.stdout


def test_two_files_give_two_rows_a_json_report_and_per_sample_lines(judge_folder, inputs):
    args = [
        "eval-ppl",
        *inputs,
        "--judge",
        judge_folder,
        "--device",
        "cpu",
        "--json",
        "out/report.json",
        "--per-sample",
        "out/samples.jsonl",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "draft.jsonl" in result.stderr and "refined.txt" in result.stderr and "gen PPL" in result.stderr

    with open("out/report.json") as handle:
        report = json.load(handle)
    assert list(report["files"]) == inputs
    for summary in report["files"].values():
        assert set(summary) >= SUMMARY_KEYS
    assert report["files"]["refined.txt"]["num_samples"] == 3
    assert report["files"]["refined.txt"]["num_degenerate"] >= 1  # "aaaaaaaaaa" has entropy 0
    assert report["judge"]["name"] == judge_folder and report["judge"]["sha256"]
    assert report["settings"]["context"] == 64 and report["settings"]["stride"] == 32
    assert report["versions"]["did"] and report["versions"]["transformers"]

    with open("out/samples.jsonl") as handle:
        lines = [json.loads(line) for line in handle]
    assert [(s["file"], s["line"]) for s in lines] == [
        ("draft.jsonl", 1),
        ("draft.jsonl", 2),
        ("refined.txt", 1),
        ("refined.txt", 2),
        ("refined.txt", 3),
    ]
    assert {"ppl", "nll", "tokens", "entropy", "degenerate"} <= set(lines[0])


def test_batch_size_does_not_change_the_report(judge_folder, inputs):
    reports = []
    for batch_size in ("1", "4"):
        result = runner.invoke(
            app,
            [
                "eval-ppl",
                *inputs,
                "--judge",
                judge_folder,
                "--device",
                "cpu",
                "--json",
                "-",
                "--batch-size",
                batch_size,
                "--context",
                "8",
                "-q",
            ],
        )
        assert result.exit_code == 0, result.stderr
        reports.append(json.loads(result.stdout)["files"])
    for name in inputs:
        for key in ("gen_ppl", "gen_ppl_pooled", "entropy"):
            assert reports[0][name][key] == pytest.approx(reports[1][name][key], rel=1e-5)


def _one_line_error(result, code=2):
    assert result.exit_code == code
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    return result.stderr


def test_a_malformed_line_is_one_error_naming_it(judge_folder, inputs):
    with open("draft.jsonl", "a") as handle:
        handle.write('{"text": "trunc\n')
    stderr = _one_line_error(runner.invoke(app, ["eval-ppl", *inputs, "--judge", judge_folder]))
    assert "draft.jsonl line 3: not valid JSON" in stderr


def test_an_uncached_judge_offline_says_how_to_pass_a_folder(inputs):
    stderr = _one_line_error(runner.invoke(app, ["eval-ppl", *inputs, "--judge", "did-tests/no-such-judge"]))
    assert "not in the local Hugging Face cache" in stderr and "--judge FOLDER" in stderr
    assert "--judge did-tiny-judge" in stderr  # the judge that always works offline


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stride", "64"], "--stride 64 must be smaller than the context of 64 tokens"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--json", "draft.jsonl"], "draft.jsonl is an input"),
        (["--per-sample", "-"], "--per-sample needs a file name"),
        (["draft.jsonl"], "draft.jsonl is given twice"),
    ],
)
def test_bad_options_are_one_line_errors(judge_folder, inputs, extra, message):
    stderr = _one_line_error(runner.invoke(app, ["eval-ppl", *inputs, "--judge", judge_folder, *extra]))
    assert message in stderr


def test_missing_input_file(judge_folder, inputs):
    assert "does not exist" in _one_line_error(runner.invoke(app, ["eval-ppl", "nope.jsonl", "--judge", judge_folder]))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_degenerate_entropy_must_be_a_finite_non_negative_number(judge_folder, inputs, value):
    stderr = _one_line_error(
        runner.invoke(app, ["eval-ppl", *inputs, "--judge", judge_folder, f"--degenerate-entropy={value}"])
    )
    assert "--degenerate-entropy must be a finite number of nats >= 0" in stderr


def test_a_folder_or_non_utf8_input_is_one_line(judge_folder, inputs, tmp_path):
    (tmp_path / "folder").mkdir()
    stderr = _one_line_error(runner.invoke(app, ["eval-ppl", "folder", "--judge", judge_folder]))
    assert "folder is a directory" in stderr
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    stderr = _one_line_error(runner.invoke(app, ["eval-ppl", "latin1.txt", "--judge", judge_folder]))
    assert "latin1.txt is not UTF-8 text" in stderr


def _expected_threshold(threshold, tokens):
    """4.0 nats at 256 tokens (BD3-LM's window), scaled by the log n bound below it."""
    return threshold * min(1.0, math.log(tokens) / math.log(256))


def test_degenerate_threshold_scales_with_sample_length(judge_folder, inputs):
    from did_cli.evaluation import degenerate_threshold

    assert degenerate_threshold(4.0, 256) == 4.0 and degenerate_threshold(4.0, 2048) == 4.0
    assert degenerate_threshold(4.0, 128) == pytest.approx(3.5) and degenerate_threshold(4.0, 16) == pytest.approx(2.0)
    args = ["eval-ppl", *inputs, "--judge", judge_folder, "--per-sample", "samples.jsonl", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    with open("samples.jsonl") as handle:
        samples = [json.loads(line) for line in handle]
    for sample in samples:  # entropy is over BOS + the text's tokens
        assert sample["degenerate"] == (sample["entropy"] < _expected_threshold(4.0, sample["tokens"] + 1))
    # No short text can reach 4.0 nats (log 16 = 2.77), so a fixed threshold flagged every one of them.
    assert all(s["entropy"] < 4.0 for s in samples)
    assert not samples[0]["degenerate"] and samples[-1]["degenerate"]  # "aaaaaaaaaa" has entropy near 0


def test_json_outputs_never_hold_nan_or_infinity(judge_folder, inputs):
    from did_cli.cli.eval_ppl import strict_json

    assert json.loads(strict_json({"a": [math.nan, math.inf, -math.inf, 1.5]})) == {"a": [None, None, None, 1.5]}
    with open("empty.jsonl", "w") as handle:  # an empty text has no scored token: its perplexity is undefined
        handle.write(json.dumps({"text": ""}) + "\n")
    args = ["eval-ppl", "empty.jsonl", "--judge", judge_folder, "--json", "-", "--per-sample", "s.jsonl", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr

    def refuse(constant):
        raise AssertionError(f"{constant} in JSON output")

    report = json.loads(result.stdout, parse_constant=refuse)
    assert report["files"]["empty.jsonl"]["gen_ppl"] is None
    with open("s.jsonl") as handle:
        assert json.loads(handle.read(), parse_constant=refuse)["ppl"] is None


def _table_lines(result):
    lines = result.stderr.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("file"))
    start = lines.index(header) + 2  # past the rule under the header
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())  # the blank line before the caption
    return lines, header, [line.split() for line in lines[start:end]]


def test_the_table_keeps_every_file_name_whole_at_80_columns(judge_folder, inputs, tmp_path, monkeypatch):
    module = importlib.import_module("did_cli.cli.eval_ppl")
    monkeypatch.setattr(module, "stderr", Console(stderr=True, width=80))
    names = ["some_long_directory_name/drafts_with_a_rather_long_name.jsonl", "sweep/mix/[bold]x.txt"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps({"text": "the cat sat on the mat."}) + "\n")
    result = runner.invoke(app, ["eval-ppl", *names, "--judge", judge_folder])
    assert result.exit_code == 0, result.stderr
    lines, header, rows = _table_lines(result)
    assert header.split() == ["file", "(#)", "samples", "gen", "PPL", "pooled", "entropy", "degenerate", "tokens"]
    assert [row[0] for row in rows] == ["#1", "#2"] and all(len(row) == 7 for row in rows)  # one line per file
    assert all(len(line) <= 80 for line in lines[: lines.index(header) + 4])
    # The legend names each number in full, on one line; a "[" is printed literally, never read as markup.
    assert lines[-2:] == ["file #1: drafts_with_a_rather_long_name.jsonl", "file #2: [bold]x.txt"]
    assert "…" not in result.stderr
    assert "degenerate: samples with entropy below 4 nats at 256+ tokens" in " ".join(" ".join(lines).split())


def test_names_that_differ_only_in_their_middle_stay_apart_at_any_width(judge_folder, inputs, tmp_path, monkeypatch):
    # The case: with MAUVE's column at 80 columns both printed as "mix-…sonl".
    module = importlib.import_module("did_cli.cli.eval_ppl")
    names = ["mix-draft-of-the-sweep.jsonl", "mix-refined-by-the-sweep.jsonl"]
    for name in names:
        (tmp_path / name).write_text(json.dumps({"text": "the cat sat on the mat."}) + "\n")
    for width, numbered in ((120, False), (50, True)):
        monkeypatch.setattr(module, "stderr", Console(stderr=True, width=width))
        result = runner.invoke(app, ["eval-ppl", *names, "--judge", judge_folder])
        assert result.exit_code == 0, result.stderr
        _, _, rows = _table_lines(result)
        if numbered:
            assert [row[0] for row in rows] == ["#1", "#2"]
            assert result.stderr.splitlines()[-2:] == [f"file #{i}: {name}" for i, name in enumerate(names, 1)]
        else:
            assert [row[0] for row in rows] == names and "file #1" not in result.stderr


def test_short_names_tell_the_inputs_apart():
    from did_cli.cli.eval_ppl import short_names

    assert short_names(["a/mix/draft.jsonl", "a/nomix/draft.jsonl", "b/x.txt"]) == [
        "mix/draft.jsonl",
        "nomix/draft.jsonl",
        "x.txt",
    ]
    assert short_names(["a/draft.jsonl", "b/refined.jsonl"]) == ["draft.jsonl", "refined.jsonl"]


def test_json_gives_the_sha256_of_every_input_stdin_included(judge_folder, inputs, tmp_path):
    import hashlib

    text = (tmp_path / "draft.jsonl").read_bytes()
    args = ["eval-ppl", "-", "refined.txt", "--judge", judge_folder, "--json", "-", "-q"]
    result = runner.invoke(app, args, input=text)
    assert result.exit_code == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert files["-"]["sha256"] == hashlib.sha256(text).hexdigest()  # of the bytes read
    assert files["refined.txt"]["sha256"] == hashlib.sha256((tmp_path / "refined.txt").read_bytes()).hexdigest()


@pytest.mark.slow  # a subprocess that imports torch and transformers: ~5 s
def test_stdout_holds_only_the_json_when_stderr_is_a_terminal(judge_folder, inputs, tmp_path):
    import os
    import shlex
    import subprocess
    import sys

    command = [sys.executable, "-m", "did_cli", "eval-ppl", *inputs, "--judge", judge_folder, "--json", "-"]
    shell = f"{shlex.join(command)} > out.json"  # stderr (progress, table) stays on the pseudo-terminal
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env["PYTHONPATH"]
    done = subprocess.run(
        ["script", "-qec", shell, "/dev/null"], cwd=tmp_path, env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stdout.decode(errors="replace")
    assert list(json.loads((tmp_path / "out.json").read_text())["files"]) == inputs
    assert b"gen PPL" in done.stdout  # the table went to the terminal

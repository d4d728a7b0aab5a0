import json

import pytest
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

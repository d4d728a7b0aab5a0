"""--confidence-threshold and --refine-cache from the command line: recorded per stage, refused when contradictory."""

import json

from typer.testing import CliRunner

from did_cli.cli import app

runner = CliRunner()


def test_generate_records_threshold_refine_cache_and_commits_per_call(tiny_checkpoint, tmp_path):
    out = tmp_path / "g.jsonl"
    args = ["generate", "-m", str(tiny_checkpoint), "-n", "2", "--length", "32", "-q", "-o", str(out)]
    result = runner.invoke(app, [*args, "--confidence-threshold", "0.05", "--refine-cache", "4"])
    assert result.exit_code == 0, result.output
    for line in out.read_text().splitlines():
        draft, refine = json.loads(line)["stages"]
        assert draft["confidence_threshold"] == refine["confidence_threshold"] == 0.05
        assert draft["order"] == refine["order"] == "confidence"
        assert refine["refine_cache"] == 4 and "refine_cache" not in draft
        for stage in (draft, refine):
            histogram = {int(k): n for k, n in stage["tokens_per_call_histogram"].items()}
            assert sum(histogram.values()) == stage["nfes"]
            assert stage["tokens_per_call_max"] == max(histogram)
            assert abs(stage["tokens_per_call_mean"] * stage["nfes"] - sum(k * n for k, n in histogram.items())) < 1e-9
        assert sum(int(k) * n for k, n in refine["tokens_per_call_histogram"].items()) == len(refine["remasked"])
    # Resuming with other settings is refused on the first differing key; the same settings resume.
    again = runner.invoke(app, [*args, "--resume", "--confidence-threshold", "0.05", "--refine-cache", "8"])
    assert again.exit_code != 0 and "refine_cache=4" in again.output
    same = runner.invoke(app, [*args, "--resume", "--confidence-threshold", "0.05", "--refine-cache", "4"])
    assert same.exit_code == 0, same.output


def test_records_from_before_refine_cache_resume_as_exact(tiny_checkpoint, tmp_path):
    out = tmp_path / "g.jsonl"
    args = ["generate", "-m", str(tiny_checkpoint), "-n", "2", "--length", "32", "-q", "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record in records:
        del record["stages"][1]["refine_cache"]  # as written before the option existed
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_contradictory_flags_fail_in_one_line(tiny_checkpoint):
    for extra in (
        ["--order", "steps", "--steps-per-block", "2", "--confidence-threshold", "0.9"],
        ["--confidence-threshold", "0.9", "--tokens-per-call", "2"],
        ["--refine-cache", "4", "--stages", "4,8"],
        ["--refine-cache", "0"],
    ):
        result = runner.invoke(app, ["generate", "-m", str(tiny_checkpoint), "--length", "32", *extra])
        assert result.exit_code != 0
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output

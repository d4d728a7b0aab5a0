"""`did sweep` draft-side axes: the draft frontier, gen PPL at matched entropy, its table, verdict and plot."""

import json
import math

import pytest
from typer.testing import CliRunner

from did_cli.ablation import SweepSettings, Variant, frontier_variants, run_sweep
from did_cli.ablation.entropy_matched import FrontierPoint, draft_frontier, match_entropy
from did_cli.ablation.matched import matched_comparison
from did_cli.ablation.results import read_results
from did_cli.ablation.tables import render_report
from did_cli.cli import app
from did_cli.errors import UsageError
from did_cli.records import read_records
from did_cli.settings import UnmaskingSettings
from tests.ablation.test_sweep import tiny_settings

PNG = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def frontier_sweep(tiny_checkpoint, judge_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("entropy") / "out"
    settings = tiny_settings(
        tiny_checkpoint, judge_folder, out, num_samples=4, batch_size=4, draft_top_ps=[0.5, 0.9, 1.0]
    )
    return out, settings, run_sweep(settings)


def test_frontier_variants_cross_the_axes_and_leave_out_the_sweeps_own_draft():
    base = UnmaskingSettings(top_p=0.9, temperature=1.0)
    variants = frontier_variants([0.8, 0.9, 1.0], [0.7, 1.0], base)
    assert [v.id for v in variants] == [
        "draft-p0.8-temp0.7",
        "draft-p0.8",
        "draft-temp0.7",
        "draft-p1-temp0.7",
        "draft-p1",
    ]
    assert all(v.frontier and v.remask is None for v in variants) and not Variant().frontier
    assert variants[0].unmasking(base) == UnmaskingSettings(top_p=0.8, temperature=0.7)
    assert frontier_variants([], [], base) == []


@pytest.mark.parametrize(
    ("overrides", "message"), [({"draft_top_ps": [0.0]}, "top_p"), ({"draft_temperatures": [-1]}, "temperature")]
)
def test_bad_frontier_values_are_refused(overrides, message):
    with pytest.raises(UsageError, match=message):
        SweepSettings(models=["did-tiny"], **overrides)


def test_sweep_scores_a_draft_per_frontier_setting_and_refines_only_the_base_drafts(frontier_sweep):
    out, settings, result = frontier_sweep
    rows = {r["variant"]: r for r in read_results(out / "results.jsonl")}
    assert list(rows) == ["draft", "draft-p0.5", "draft-p1", "snapshot-g0.5-b32", "random-g0.5-b32"]
    assert [rows[v]["draft_frontier"] for v in rows] == [False, True, True, False, False]
    assert [rows[v]["top_p"] for v in rows] == [0.9, 0.5, 1.0, 0.9, 0.9]
    folder = out / "tiny" / next(p.name for p in (out / "tiny").iterdir())
    for name, top_p in (("draft", 0.9), ("draft-p0.5", 0.5), ("draft-p1", 1.0)):
        records = list(read_records(folder / f"{name}.jsonl"))
        assert len(records) == 4 and all(r.stages[0]["top_p"] == top_p for r in records)
    drafts = list(read_records(folder / "draft.jsonl"))
    refined = list(read_records(folder / "snapshot-g0.5-b32.jsonl"))
    assert [r.draft_tokens for r in refined] == [d.tokens for d in drafts]
    # A sharper nucleus gives less diverse text: the frontier's reason to exist.
    assert rows["draft-p0.5"]["entropy"] < rows["draft-p1"]["entropy"]
    # Per-sample values are stored and average to the row's numbers.
    for row in rows.values():
        per_sample = row["per_sample"]
        assert per_sample["id"] == [0, 1, 2, 3]
        assert math.fsum(per_sample["ppl"]) / 4 == pytest.approx(row["gen_ppl"])
        assert math.fsum(per_sample["entropy"]) / 4 == pytest.approx(row["entropy"])


def test_report_has_the_frontier_table_matched_differences_verdict_and_plot(frontier_sweep):
    out, _, result = frontier_sweep
    text = (out / "report.md").read_text()
    assert "### Gen PPL at matched entropy" in text and "## Verdict at matched entropy" in text
    assert (out / "entropy_frontier.png").read_bytes().startswith(PNG)
    assert out / "entropy_frontier.png" in result.plots
    assert len(result.verdicts) == 1 and result.verdicts[0].startswith("tiny (2 refined variants): ")
    # The matched number in the report is the interpolation recomputed here from the rows.
    rows = {r["variant"]: r for r in read_results(out / "results.jsonl")}
    points = [FrontierPoint(v, rows[v]["entropy"], rows[v]["gen_ppl"]) for v in ("draft", "draft-p0.5", "draft-p1")]
    frontier = draft_frontier(points)
    for variant in ("snapshot-g0.5-b32", "random-g0.5-b32"):
        row = rows[variant]
        matched = match_entropy(FrontierPoint(variant, row["entropy"], row["gen_ppl"]), frontier)
        section = text.split("### Gen PPL at matched entropy")[1]
        line = next(line for line in section.splitlines() if line.startswith(f"| {variant} |"))
        if matched.status == "matched":
            assert f"{matched.frontier_gen_ppl:.2f}" in line and f"{matched.difference:+.2f}" in line
        else:
            assert "not matched" in line and ("below" in line or "above" in line)
    # The paper's tables never see the frontier's drafts.
    strategy = text.split("### Remask strategy")[1].split("###")[0]
    assert "draft-p0.5" not in strategy


def test_rerunning_recomputes_nothing(frontier_sweep):
    out, settings, _ = frontier_sweep
    again = run_sweep(settings)
    assert (again.drafted, again.refined, again.scored, again.reused) == (0, 0, 0, 5)


def test_a_variant_outside_the_frontier_is_said_to_be_so_in_table_and_verdict():
    def row(variant, entropy, ppl, frontier=False, remask=None):
        return {
            "model": "m",
            "variant": variant,
            "remask": remask,
            "draft_frontier": frontier,
            "gen_ppl": ppl,
            "entropy": entropy,
            "length": 128,
            "top_p": 0.9,
            "temperature": 1.0,
        }

    rows = [
        row("draft", 4.0, 70.0),
        row("draft-p0.8", 3.9, 55.0, frontier=True),
        row("snapshot-g0.5-b128", 3.85, 40.0, remask="snapshot"),  # below 3.9: not matched
        row("random-g0.5-b128", 3.95, 60.0, remask="random"),  # halfway: sqrt(55 * 70) = 62.05
    ]
    comparison = matched_comparison(rows)
    assert [m.status for _, m in comparison.variants] == ["below", "matched"]
    assert comparison.variants[1][1].frontier_gen_ppl == pytest.approx(math.sqrt(55.0 * 70.0))
    text = render_report(rows)
    section = text.split("### Gen PPL at matched entropy")[1]
    line = next(line for line in section.splitlines() if line.startswith("| snapshot-g0.5-b128 |"))
    assert "not matched: entropy 3.850 is below the frontier's lowest entropy (3.900)" in line
    assert "1 outside the frontier's entropy range (snapshot-g0.5-b128)" in text
    assert "none beats the draft frontier" in text  # no per-sample values: no standard error, no verdict of "beats"


def test_cli_takes_draft_axes_as_lists_and_prints_the_verdict(tiny_checkpoint, judge_folder, tmp_path):
    out = tmp_path / "out"
    args = ["sweep", "--model", f"tiny={tiny_checkpoint}", "--judge", judge_folder, "-n", "2", "--length", "32"]
    args += ["--remask", "snapshot", "--gamma", "0.5", "--refine-block-size", "32", "--device", "cpu"]
    args += ["--top-p", "0.7,0.95", "--temperature", "1.0", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    verdict = [line for line in result.stderr.splitlines() if line.startswith("verdict: ")]
    assert len(verdict) == 1 and verdict[0].startswith("verdict: tiny (1 refined variant): ")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # 0.9 is not listed, so the refined variant refines the drafts at the first value.
    assert [(r["variant"], r["top_p"]) for r in rows] == [
        ("draft", 0.7),
        ("draft-p0.95", 0.95),
        ("snapshot-g0.5-b32", 0.7),
    ]
    bad = runner.invoke(app, [*args[:-2], "--top-p", "0.5,x", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--top-p must be a comma-separated list" in bad.stderr


def test_a_second_sweep_into_the_same_folder_is_refused_while_one_runs(tiny_checkpoint, judge_folder, tmp_path):
    from did_cli.locks import locked_folder

    out = tmp_path / "out"
    settings = tiny_settings(tiny_checkpoint, judge_folder, out, num_samples=2, batch_size=2, remask=["snapshot"])
    with locked_folder(out, what="did sweep"), pytest.raises(UsageError, match="another did sweep is running"):
        run_sweep(settings)
    assert not (out / "results.jsonl").exists()


def test_a_plot_of_earlier_rows_does_not_outlive_them(frontier_sweep, tmp_path):
    import shutil

    from did_cli.ablation.report import write_report

    out, _, _ = frontier_sweep
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    rows = [r for r in read_results(copy / "results.jsonl") if not r["draft_frontier"]]
    written = write_report(copy, rows)
    assert not (copy / "entropy_frontier.png").exists() and copy / "entropy_frontier.png" not in written.plots
    assert (copy / "gamma_curve.png").exists()


def test_rows_without_per_sample_values_get_no_verdict_and_say_why():
    rows = [
        {"model": "m", "variant": "draft", "remask": None, "gen_ppl": 70.0, "entropy": 4.0, "length": 128},
        {
            "model": "m",
            "variant": "draft-p0.8",
            "remask": None,
            "draft_frontier": True,
            "gen_ppl": 50.0,
            "entropy": 3.8,
            "length": 128,
        },
        {
            "model": "m",
            "variant": "snapshot-g0.5-b128",
            "remask": "snapshot",
            "gamma": 0.5,
            "refine_block_size": 128,
            "gen_ppl": 20.0,
            "entropy": 3.9,
            "length": 128,
        },
    ]
    text = render_report(rows)
    assert "1 without a standard error (snapshot-g0.5-b128: fewer than 2 samples, or rows from an older did" in text
    assert "no standard error: no verdict" in text and "within noise" not in text


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--top-p", "0.5,1.5", "--top-p values must be in (0, 1], got 1.5"),
        ("--top-p", "0", "--top-p values must be in (0, 1], got 0.0"),
        ("--temperature", "0.8,inf", "--temperature values must be positive and finite, got inf"),
    ],
)
def test_out_of_range_frontier_values_name_their_flag(flag, value, message, tmp_path):
    result = runner.invoke(app, ["sweep", "--model", "did-tiny", flag, value, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and f"error: {message}" in result.stderr
    assert not (tmp_path / "out").exists()

"""`did sweep` axes for cheaper refinement: --confidence-threshold and --refine-cache variants and their table."""

import json

import pytest

from did_cli.ablation import DRAFT, SweepSettings, Variant, plan_variants, run_sweep
from did_cli.ablation.results import read_results
from did_cli.errors import UsageError
from tests.ablation.test_sweep import tiny_settings


def test_cheaper_variants_cross_thresholds_and_r_at_the_base_point_with_a_global_block():
    variants = plan_variants(
        ["snapshot"],
        [0.5],
        [16, 64],
        base_gamma=0.5,
        base_block_size=16,
        confidence_thresholds=[0.9],
        refine_caches=[1, 4],
    )
    cheaper = [v for v in variants if not v.exact]
    assert cheaper == [
        Variant("snapshot", 0.5, 64, None, 4),
        Variant("snapshot", 0.5, 64, 0.9, 1),
        Variant("snapshot", 0.5, 64, 0.9, 4),
    ]
    assert Variant("snapshot", 0.5, 64) in variants and variants[0] is DRAFT  # the exact reference is there
    assert [v.id for v in cheaper] == ["snapshot-g0.5-b64-r4", "snapshot-g0.5-b64-t0.9", "snapshot-g0.5-b64-t0.9-r4"]
    plain = plan_variants(["snapshot"], [0.5], [64], base_gamma=0.5, base_block_size=64)
    assert all(v.exact for v in plain)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"confidence_thresholds": [1.5]}, r"in \[0, 1\]"), ({"refine_caches": [0]}, "refine-cache")],
)
def test_bad_cheaper_settings_are_refused(overrides, message):
    with pytest.raises(UsageError, match=message):
        SweepSettings(models=["did-tiny"], **overrides)


def test_sweep_scores_cheaper_refinements_and_reports_their_time_and_kept_gain(tiny_checkpoint, judge_folder, tmp_path):
    out = tmp_path / "out"
    settings = tiny_settings(
        tiny_checkpoint, judge_folder, out, remask=["snapshot"], confidence_thresholds=[0.05], refine_caches=[1, 4]
    )
    result = run_sweep(settings)
    rows = {r["variant"]: r for r in read_results(out / "results.jsonl")}
    assert list(rows) == [
        "draft",
        "snapshot-g0.5-b32",
        "snapshot-g0.5-b32-r4",
        "snapshot-g0.5-b32-t0.05",
        "snapshot-g0.5-b32-t0.05-r4",
    ]
    exact, cached, threshold = rows["snapshot-g0.5-b32"], rows["snapshot-g0.5-b32-r4"], rows["snapshot-g0.5-b32-t0.05"]
    assert cached["refine_cache"] == 4 and cached["confidence_threshold"] is None
    assert cached["refine_nfes"] == exact["refine_nfes"] == 16  # same calls, cheaper ones
    assert threshold["refine_nfes"] < exact["refine_nfes"]  # several tokens in some calls
    for row in rows.values():
        assert row["draft_seconds"] > 0 and row["seconds"] == pytest.approx(
            row["draft_seconds"] + row["refine_seconds"]
        )
    (folder,) = (out / "tiny").iterdir()
    for line in (folder / "snapshot-g0.5-b32-t0.05-r4.jsonl").read_text().splitlines():
        stage = json.loads(line)["stages"][1]
        assert stage["refine_cache"] == 4 and stage["confidence_threshold"] == 0.05 and stage["order"] == "confidence"
    text = result.report.read_text()
    assert "### Cheaper refinement: time against quality" in text
    table = text.split("### Cheaper refinement")[1]
    assert "| snapshot-g0.5-b32-t0.05-r4 | 0.05 | 4 |" in table and "| snapshot-g0.5-b32 | — | 1 |" in table
    assert "100 %" in table  # the exact refinement keeps all of its own gain
    # The paper's tables still read the exact refinement only.
    strategy = text.split("### Remask strategy")[1].split("###")[0]
    assert f"{exact['gen_ppl']:.2f}" in strategy
    again = run_sweep(settings)
    assert (again.drafted, again.refined, again.scored, again.reused) == (0, 0, 0, 5)


def _row(variant, gen_ppl, remask="snapshot", threshold=None, r=1):
    return {
        "model": "m",
        "variant": variant,
        "remask": remask,
        "gamma": None if remask is None else 0.5,
        "refine_block_size": None if remask is None else 32,
        "confidence_threshold": threshold,
        "refine_cache": r,
        "length": 32,
        "gen_ppl": gen_ppl,
        "entropy": 4.0,
        "nfes": 10.0,
        "refine_nfes": 5.0,
        "draft_seconds": 2.0,
        "refine_seconds": 1.0,
        "seconds": 3.0,
    }


def test_threshold_variants_are_read_against_the_one_token_per_call_confidence_order():
    from did_cli.ablation.tables import render_report

    rows = [
        _row("draft", 100.0, remask=None),
        _row("exact", 60.0),
        _row("cached", 70.0, r=4),
        _row("one-by-one", 50.0, threshold=1.0),
        _row("t0.5", 55.0, threshold=0.5),
    ]
    table = render_report(rows).split("### Cheaper refinement")[1]
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 75 % | exact |" in lines["cached"]  # (100 - 70) / (100 - 60)
    assert "| 90 % | one-by-one |" in lines["t0.5"]  # (100 - 55) / (100 - 50)
    assert "| 125 % | exact |" in lines["one-by-one"]
    assert "| 0.50 |" in lines["cached"]  # refine ÷ draft time
    # The paper's tables read the exact refinement only.
    assert "60.00" in render_report(rows).split("### Remask strategy")[1].split("###")[0]

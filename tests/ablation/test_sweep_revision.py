"""The sweep's strategy axis takes every remask strategy and editing, and reads them like the paper's strategies."""

import pytest

from did_cli.ablation import run_sweep
from did_cli.ablation.plan import EDIT, SweepSettings, Variant, plan_variants
from did_cli.errors import UsageError
from tests.ablation.test_sweep import tiny_settings


def test_plan_puts_editing_beside_the_base_point_at_each_threshold():
    variants = plan_variants(
        ["snapshot", "mc-dropout", EDIT], [0.25, 0.5], [32], base_gamma=0.5, base_block_size=32,
        edit_thresholds=[0.9, 0.5],
    )  # fmt: skip
    ids = [v.id for v in variants]
    assert ids == ["draft", "snapshot-g0.5-b32", "mc-dropout-g0.5-b32", "edit-t0.9", "edit-t0.5", "snapshot-g0.25-b32"]
    grid = plan_variants(
        ["snapshot", "noise-ensemble"], [0.25, 0.5], [32], base_gamma=0.5, base_block_size=32, grid=True
    )
    assert {v.id for v in grid} >= {"noise-ensemble-g0.25-b32", "noise-ensemble-g0.5-b32"}


def test_settings_refuse_unknown_strategies_and_bad_edit_thresholds(tiny_checkpoint):
    with pytest.raises(UsageError, match="unknown remask strategy 'best'"):
        SweepSettings(models=[str(tiny_checkpoint)], remask=["best"])
    with pytest.raises(UsageError, match="--edit-threshold must be in"):
        SweepSettings(models=[str(tiny_checkpoint)], remask=["edit"], edit_thresholds=[2.0])
    assert Variant(EDIT, edit_threshold=0.75).id == "edit-t0.75"


def test_a_sweep_over_new_strategies_and_editing_scores_and_reports_each(tiny_checkpoint, judge_folder, tmp_path):
    settings = tiny_settings(
        tiny_checkpoint, judge_folder, tmp_path / "out", remask=["snapshot-entropy", "mc-variance", "edit"],
        edit_thresholds=[0.05, 1.0], passes=2,
    )  # fmt: skip
    result = run_sweep(settings)
    rows = {row["variant"]: row for row in result.rows}
    assert {"draft", "snapshot-entropy-g0.5-b32", "mc-variance-g0.5-b32", "edit-t0.05", "edit-t1"} <= set(rows)
    assert rows["edit-t1"]["remask"] == "edit" and rows["edit-t1"]["edit_threshold"] == 1.0
    # A threshold of 1 edits nothing: the same texts, so exactly the draft's numbers.
    assert rows["edit-t1"]["gen_ppl"] == rows["draft"]["gen_ppl"]
    assert rows["mc-variance-g0.5-b32"]["refine_nfes"] >= 16 + 2  # 16 remasked tokens, 2 scoring passes
    text = result.report.read_text()
    assert "mc-variance-g0.5-b32" in text and "edit-t0.05" in text

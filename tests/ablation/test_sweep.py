import hashlib
import json
import shutil
from pathlib import Path

import pytest

from did_cli.ablation import (
    DRAFT,
    SweepSettings,
    Variant,
    parse_model,
    plan_variants,
    plots,
    refine_block_sizes,
    report,
    run_sweep,
)
from did_cli.ablation.report import write_report
from did_cli.ablation.results import read_results
from did_cli.ablation.rows import pareto_front
from did_cli.ablation.tables import render_report
from did_cli.errors import ModelLoadError, UsageError
from did_cli.evaluation import EvalSettings
from did_cli.settings import RefineSettings

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_settings(checkpoint, judge, out, **overrides):
    """Two refined variants (snapshot and random at γ 0.5, B2 = L = 32) plus the draft, 3 samples each."""
    base = dict(
        models=[f"tiny={checkpoint}"],
        judge=judge,
        out=out,
        num_samples=3,
        remask=["snapshot", "random"],
        gammas=[0.5],
        refine_block_sizes=[32],
        batch_size=3,
        device="cpu",
    )
    return SweepSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def swept(tiny_checkpoint, judge_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    events = []
    result = run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out), events.append)
    return out, result, events


# --- Planning -----------------------------------------------------------------------------------------------------


def test_default_plan_varies_one_axis_at_a_time_around_snapshot_half_and_l():
    sizes, notes = refine_block_sizes(None, 1024)
    assert sizes == [16, 64, 1024] and notes == []
    gammas = [0.1, 0.25, 0.5, 0.75, 1.0]
    variants = plan_variants(["snapshot", "posthoc", "random"], gammas, sizes, base_gamma=0.5, base_block_size=1024)
    expected = {DRAFT} | {Variant(s, 0.5, 1024) for s in ("snapshot", "posthoc", "random")}
    expected |= {Variant("snapshot", g, 1024) for g in gammas} | {Variant("snapshot", 0.5, b) for b in sizes}
    assert variants[0] == DRAFT and set(variants) == expected and len(variants) == len(expected) == 10


def test_without_snapshot_the_first_strategy_is_swept():
    variants = plan_variants(["random", "posthoc"], [0.25], [16, 32], base_gamma=0.5, base_block_size=32)
    assert set(variants) == {
        DRAFT,
        Variant("random", 0.5, 32),
        Variant("posthoc", 0.5, 32),
        Variant("random", 0.25, 32),
        Variant("random", 0.5, 16),
    }


def test_grid_runs_the_full_product():
    variants = plan_variants(
        ["snapshot", "random"], [0.25, 0.75], [16, 64], base_gamma=0.5, base_block_size=64, grid=True
    )
    # 2 strategies x (2 gammas x 2 sizes + the base point 0.5/64, which is not in the product)
    assert len(variants) == 1 + 2 * 5
    assert Variant("random", 0.25, 16) in variants


def test_refine_block_sizes_map_large_values_to_one_global_block():
    assert refine_block_sizes([16, 64, 1024], 32) == ([16, 32], [])
    assert refine_block_sizes(None, 32) == ([16, 32], [])


def test_default_sizes_that_do_not_divide_l_are_dropped_with_a_note_but_explicit_ones_are_an_error():
    sizes, notes = refine_block_sizes(None, 40)
    assert sizes == [40] and len(notes) == 1 and "16" in notes[0]
    with pytest.raises(UsageError, match="does not divide"):
        refine_block_sizes([16], 40)


def test_variant_ids_name_the_files():
    assert DRAFT.id == "draft"
    assert Variant("posthoc", 0.25, 1024).id == "posthoc-g0.25-b1024"
    assert Variant("snapshot", 1.0, 16).id == "snapshot-g1-b16"


def test_model_labels_come_from_label_or_path():
    assert parse_model("mix=runs/a/final") == parse_model("mix=runs/a/final")
    assert parse_model("mix=runs/a/final").label == "mix"
    assert parse_model("runs/a/final").label == "a-final"
    assert parse_model("kuleshov-group/bd3lm-owt-block_size4").label == "bd3lm-owt-block_size4"
    with pytest.raises(UsageError):
        parse_model("bad label!=runs/a")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"gammas": [0.5, 1.5]}, "--gamma"),
        ({"remask": ["snapshot", "best"]}, "remask strategy"),
        ({"models": []}, "--model"),
        ({"models": ["runs/a", "b/a"]}, "label"),
        ({"length": 30, "draft_block_size": 4}, "does not divide"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(overrides, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        tiny_settings("did-tiny", "did-tiny-judge", tmp_path, **overrides)


# --- A tiny sweep end to end --------------------------------------------------------------------------------------


def test_sweep_scores_the_draft_and_every_variant_once(swept):
    out, result, _ = swept
    rows = read_results(out / "results.jsonl")
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("tiny", "draft"),
        ("tiny", "snapshot-g0.5-b32"),
        ("tiny", "random-g0.5-b32"),
    ]
    assert (result.drafted, result.refined, result.scored, result.reused) == (1, 2, 3, 0)
    draft, snapshot, _ = rows
    assert snapshot["remask"] == "snapshot" and snapshot["gamma"] == 0.5 and snapshot["refine_block_size"] == 32
    for row in rows:
        assert row["num_samples"] == 3 and row["gen_ppl"] > 1 and row["entropy"] > 0 and row["seconds"] > 0
    # The draft costs 31 NFEs (one token per call after BOS); a refinement adds one call per remasked token.
    assert draft["nfes"] == draft["draft_nfes"] == 31 and draft["refine_nfes"] == 0
    assert snapshot["nfes"] == 31 + 16 and snapshot["refine_nfes"] == 16


def _samples_folder(out):
    """The one folder of sample files under the model label (named by a hash of the draft settings)."""
    (folder,) = (out / "tiny").iterdir()
    return folder


def test_every_variant_refines_the_same_drafts(swept):
    out, _, _ = swept
    drafts = [json.loads(line) for line in (_samples_folder(out) / "draft.jsonl").read_text().splitlines()]
    for name in ("snapshot-g0.5-b32", "random-g0.5-b32"):
        refined = [json.loads(line) for line in (_samples_folder(out) / f"{name}.jsonl").read_text().splitlines()]
        assert [r["draft_tokens"] for r in refined] == [d["tokens"] for d in drafts]


def test_report_holds_the_paper_tables_and_valid_png_plots(swept):
    out, result, _ = swept
    text = (out / "report.md").read_text()
    for heading in ("### Remask strategy", "### γ sweep", "### Refine block size B2", "### NFEs against gen PPL"):
        assert heading in text
    assert "| none (draft only) |" in text and "| snapshot |" in text and "| random |" in text
    assert "entropy" in text and "32 (global)" in text
    assert [p.name for p in result.plots] == ["gamma_curve.png", "nfe_pareto.png"]
    for plot in result.plots:
        assert plot.read_bytes()[:8] == PNG
        assert f"]({plot.name})" in text


def test_running_again_recomputes_nothing(swept, tiny_checkpoint, judge_folder):
    out, first, _ = swept
    files = sorted(_samples_folder(out).iterdir())
    stamps = {f: f.stat().st_mtime_ns for f in files}
    results = (out / "results.jsonl").read_text()
    again = run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out))
    assert (again.drafted, again.refined, again.scored, again.reused) == (0, 0, 0, 3)
    assert again.rows == first.rows
    assert (out / "results.jsonl").read_text() == results
    assert sorted(_samples_folder(out).iterdir()) == files
    assert {f: f.stat().st_mtime_ns for f in files} == stamps


def test_an_interrupted_file_is_redone_and_complete_files_are_reused(swept, tiny_checkpoint, judge_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(swept[0], out)
    (out / "results.jsonl").unlink()
    cut = _samples_folder(out) / "random-g0.5-b32.jsonl"
    cut.write_text(cut.read_text()[:-40])  # a run killed while writing the last sample
    result = run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out))
    assert (result.drafted, result.refined, result.scored) == (0, 1, 3)
    assert [r["gen_ppl"] for r in result.rows] == [r["gen_ppl"] for r in swept[1].rows]


def test_changed_settings_are_not_served_from_old_rows(swept, tiny_checkpoint, judge_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(swept[0], out)
    result = run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out, num_samples=2, remask=["snapshot"]))
    assert (result.drafted, result.refined, result.scored, result.reused) == (1, 1, 2, 0)
    assert all(r["num_samples"] == 2 for r in result.rows)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_rerun_with_other_settings_never_changes_a_file_an_older_row_cites(
    swept, tiny_checkpoint, judge_folder, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(swept[0], out)
    before = {row["file"]: _digest(out / row["file"]) for row in read_results(out / "results.jsonl")}
    for overrides in ({"num_samples": 2}, {"seed": 1}):
        run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out, remask=["snapshot"], **overrides))
    rows = read_results(out / "results.jsonl")
    assert {row["file"]: _digest(out / row["file"]) for row in rows[:3]} == before
    assert len({row["file"] for row in rows}) == len(rows) == 3 + 2 + 2  # every row cites its own file
    for row in rows:  # and that file holds the samples the row was scored on
        records = [json.loads(line) for line in (out / row["file"]).read_text().splitlines()]
        assert len(records) == row["num_samples"] and {r["seed"] for r in records} == {row["config"]["seed"]}


def test_the_judge_is_checked_before_any_drafting(tiny_checkpoint, tmp_path):
    events = []
    with pytest.raises(ModelLoadError, match="no-such-judge"):
        run_sweep(tiny_settings(tiny_checkpoint, "did-tests/no-such-judge", tmp_path / "out"), events.append)
    assert not list(tmp_path.rglob("*.jsonl"))
    assert not any(e.kind == "progress" for e in events)


def test_post_hoc_is_a_spelling_of_posthoc(tmp_path):
    settings = SweepSettings(models=["did-tiny"], remask=["post-hoc", "Snapshot", "posthoc"], out=tmp_path)
    assert settings.remask == ("posthoc", "snapshot")
    assert RefineSettings(remask="post-hoc").remask == "posthoc"
    with pytest.raises(UsageError, match="unknown remask strategy 'post hoc'"):
        RefineSettings(remask="post hoc")


def test_events_report_steps_and_the_end(swept):
    _, _, events = swept
    steps = [e for e in events if e.kind == "step"]
    assert steps[0].steps == 3 and steps[-1].step == 3
    assert any(e.kind == "progress" and e.unit == "samples" for e in events)


# --- The report alone ---------------------------------------------------------------------------------------------


def test_report_without_matplotlib_says_so_in_one_line(swept, tmp_path, monkeypatch):
    shutil.copy(swept[0] / "results.jsonl", tmp_path / "results.jsonl")
    monkeypatch.setattr(report, "figure_classes", lambda: None)
    written = write_report(tmp_path)
    text = written.path.read_text()
    assert written.plots == [] and not list(tmp_path.glob("*.png"))
    assert text.count(report.NO_PLOTS) == 1 and "### Remask strategy" in text


def test_several_models_get_a_side_by_side_table_and_a_section_each(swept):
    rows = read_results(swept[0] / "results.jsonl")
    other = [{**row, "model": "other"} for row in rows]
    text = render_report(rows + other)
    assert "## Models side by side" in text and "| tiny gen PPL | tiny entropy | other gen PPL |" in text
    assert "## tiny" in text and "## other" in text


def test_pareto_front_keeps_points_nothing_beats():
    points = [(31, 100.0), (47, 90.0), (47, 95.0), (62, 90.0), (40, 120.0)]
    assert pareto_front(points) == [0, 1]


def test_report_keeps_compatible_variants_of_earlier_runs(tiny_checkpoint, judge_folder, tmp_path):
    out = tmp_path / "out"
    run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out, remask=["random"]))
    result = run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out, remask=["snapshot"], gammas=[0.25]))
    variants = {row["variant"] for row in result.rows}
    assert {"draft", "random-g0.5-b32", "snapshot-g0.25-b32"} <= variants
    assert "random" in (out / "report.md").read_text()


# --- Plots: what a reader sees ------------------------------------------------------------------------------------


def _plot_rows() -> list[dict]:
    """Two models, the draft and three strategies at γ 0.5 plus a γ slice for snapshot, with nearby points."""
    rows = []
    for model, shift in (("mix", 0.0), ("nomix", 1.5)):
        variants = [(None, None, 127, 73.0)] + [("snapshot", g, 127 + round(128 * g), 60 - 30 * g) for g in (0.1, 0.5)]
        variants += [("posthoc", 0.5, 192, 43.5), ("random", 0.5, 191, 75.0), ("snapshot", 1.0, 254, 110.0)]
        for remask, gamma, nfes, ppl in variants:
            variant = "draft" if remask is None else f"{remask}-g{gamma:g}-b128"
            rows.append(
                {"model": model, "variant": variant, "remask": remask, "gamma": gamma, "refine_block_size": 128,
                 "length": 128, "nfes": nfes, "gen_ppl": ppl + shift, "judge": {"name": "did-tiny-judge"}}
            )  # fmt: skip
    return rows


def test_plots_give_each_strategy_its_own_colour_and_marker_and_a_legend():
    classes = plots.figure_classes()
    figure = plots.gamma_figure(classes, _plot_rows(), None)
    lines = [line for line in figure.axes[0].get_lines() if ": " in str(line.get_label())]
    by_strategy = {}
    for line in lines:
        model, strategy = line.get_label().split(": ")
        by_strategy.setdefault(strategy, set()).add((line.get_color(), line.get_marker()))
        assert line.get_linestyle() == ("-" if model == "mix" else "--")
    assert set(by_strategy) == {"snapshot", "posthoc", "random"}
    assert all(len(styles) == 1 for styles in by_strategy.values())  # a strategy looks the same for every model
    styles = [next(iter(s)) for s in by_strategy.values()]
    assert len({c for c, _ in styles}) == 3 and len({m for _, m in styles}) == 3
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert labels == ["none (draft only)", "random", "post-hoc", "snapshot", "mix", "nomix"]


def test_pareto_plot_colours_points_by_strategy_and_its_labels_never_overlap():
    classes = plots.figure_classes()
    figure = plots.pareto_figure(classes, _plot_rows())
    axes = figure.axes[0]
    colours = {tuple(c.get_facecolor()[0][:3]) for c in axes.collections}
    assert len(colours) == 4  # draft, snapshot, post-hoc, random
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in axes.texts]
    assert len(boxes) >= 2
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    names = [text.get_text() for text in axes.texts]
    assert len(names) == len(set(names))  # a variant on both models' fronts is labelled once
    assert [t.get_text() for t in figure.legends[0].get_texts()][-2:] == ["mix", "nomix"]


def test_gamma_table_shows_only_the_strategies_swept_over_gamma():
    text = render_report([r for r in _plot_rows() if r["model"] == "mix"], base_gamma=0.5)
    gamma_table = text.split("### γ sweep")[1].split("###")[0]
    assert "snapshot gen PPL" in gamma_table and "post-hoc" not in gamma_table and "random" not in gamma_table
    strategy_table = text.split("### Remask strategy")[1].split("###")[0]
    assert "| post-hoc |" in strategy_table and "| random |" in strategy_table


def test_results_of_earlier_versions_are_still_reused(tmp_path):
    # docs/ablations/results.jsonl predates the kv_cache setting; its mix rows were made with the embedded did-tiny.
    docs = Path(__file__).resolve().parents[2] / "docs" / "ablations" / "results.jsonl"
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(docs, out / "results.jsonl")
    settings = SweepSettings(
        models=["mix=did-tiny"],
        judge="did-tiny-judge",
        out=out,
        num_samples=64,
        remask=["snapshot", "posthoc", "random"],
        gammas=[0.5],
        refine_block_sizes=[128],
        evaluation=EvalSettings(degenerate_entropy=3.5),
    )

    def refuse_work(event):  # fail at once rather than after minutes of sampling
        assert not event.message.startswith("loading the judge"), "the rows were not recognised"

    result = run_sweep(settings, refuse_work)
    assert (result.drafted, result.refined, result.scored, result.reused) == (0, 0, 0, 4)

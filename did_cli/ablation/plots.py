"""The sweep report's pictures: the γ U-curve, the NFE–quality Pareto plot and gen PPL against entropy.

Plots need matplotlib, the `plots` extra; `figure_classes` returns None without it and the report says so in one
line. Figures are drawn on matplotlib's Agg canvas directly, never through pyplot, so a caller's interactive backend
and global figure state are left alone. Every strategy has one colour and marker (Okabe-Ito: colour-blind safe, and
the marker tells them apart in greyscale) and every model one line style.

Every gen PPL carries ± 1 standard error over samples (the row's `gen_ppl_sem`, as report.md gives it): error bars
on points, a band around the draft's horizontal line; on the entropy plot also ± 1 standard error of the mean entropy
(from the row's per-sample entropies), since a variant's entropy is as noisy as its gen PPL and decides where it meets
the frontier. At the sweep's usual 16-300 samples these bars are what tells a difference from noise. Labels go next
to their points, clear of each other and of every marker (`labels.place_labels`); the entropy plot labels each draft
point with what it was sampled with (its top-p, and its temperature when those vary).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from did_cli.ablation.entropy_matched import FrontierPoint
from did_cli.ablation.labels import PointLabel, place_labels
from did_cli.ablation.matched import matched_comparison
from did_cli.ablation.rows import (
    SERIES_ORDER,
    STRATEGY_NAMES,
    STRATEGY_ORDER,
    Row,
    base_size,
    close,
    draft_row,
    finite,
    pareto_front,
)
from did_cli.files import write_atomically

__all__ = [
    "STRATEGY_STYLES",
    "entropy_figure",
    "entropy_sem",
    "figure_classes",
    "gamma_figure",
    "gen_ppl_sem",
    "pareto_figure",
    "save_figure",
]


def figure_classes() -> tuple[Any, Any] | None:
    """The Figure and Agg canvas classes of matplotlib, or None when the `plots` extra is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _new_axes(classes: tuple[Any, Any]) -> tuple[Any, Any]:
    figure_class, canvas_class = classes
    figure = figure_class(figsize=(8, 4.5), layout="constrained")
    canvas_class(figure)
    return figure, figure.add_subplot()


# One colour and marker per strategy (Okabe-Ito: colour-blind safe, and the marker tells them apart in greyscale);
# one line style per model. The draft (no refinement) is black.
STRATEGY_STYLES: dict[str | None, tuple[str, str]] = {
    None: ("#000000", "*"),
    "snapshot": ("#0072B2", "o"),
    "posthoc": ("#E69F00", "s"),
    "random": ("#009E73", "^"),
    "snapshot-entropy": ("#56B4E9", "v"),
    "snapshot-margin": ("#56B4E9", ">"),
    "energy": ("#E69F00", "D"),
    "mc-dropout": ("#D55E00", "P"),
    "mc-variance": ("#D55E00", "X"),
    "noise-ensemble": ("#882255", "h"),
    "edit": ("#CC79A7", "p"),
}
_LINE_STYLES = ("-", "--", ":", "-.")


def _model_styles(rows: Sequence[Row]) -> dict[str, str]:
    models = list(dict.fromkeys(row["model"] for row in rows))
    return {model: _LINE_STYLES[i % len(_LINE_STYLES)] for i, model in enumerate(models)}


# The legend's entry for error bars and the band around the draft's line.
_BARS_LABEL = "± 1 standard error over samples"


def gen_ppl_sem(row: Row) -> float | None:
    """A row's standard error of gen PPL over samples (`gen_ppl_sem`), or None when it has none."""
    sem = row.get("gen_ppl_sem")
    return float(sem) if finite(sem) and sem > 0 else None


def entropy_sem(row: Row) -> float | None:
    """The standard error of a row's mean entropy, from its per-sample entropies; None with fewer than 2."""
    per_sample = row.get("per_sample")
    values = per_sample.get("entropy") if isinstance(per_sample, dict) else None
    values = [float(v) for v in values if finite(v)] if isinstance(values, list) else []
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def _error_bars(axes: Any, rows: Sequence[Row], x: str, color: str, *, with_entropy: bool = False) -> bool:
    """± 1 standard error of gen PPL (and of entropy, on the x axis, with `with_entropy`) at each row's point.

    A bar stops at a gen PPL of 1, the least a perplexity can be (so a log axis can show it). Rows without a standard
    error get no bar. Returns whether any bar was drawn.
    """
    rows = [r for r in rows if gen_ppl_sem(r) is not None or (with_entropy and entropy_sem(r) is not None)]
    if not rows:
        return False
    upper = [gen_ppl_sem(r) or 0.0 for r in rows]
    lower = [max(0.0, min(sem, r["gen_ppl"] - 1)) for r, sem in zip(rows, upper, strict=True)]
    xerr = [entropy_sem(r) or 0.0 for r in rows] if with_entropy else None
    axes.errorbar(
        [r[x] for r in rows],
        [r["gen_ppl"] for r in rows],
        yerr=[lower, upper],
        xerr=xerr,
        fmt="none",
        ecolor=color,
        elinewidth=0.9,
        capsize=2.5,
        alpha=0.75,
        zorder=2.5,
    )
    return True


def _bars_handle() -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color="#555555", marker="|", markersize=10, linestyle="", label=_BARS_LABEL)


def _legend(
    figure: Any,
    strategies: Sequence[str | None],
    models: dict[str, str],
    draft_line: bool = False,
    extra: Sequence[Any] = (),
    below: bool = False,
) -> None:
    """One legend beside the axes (or below): a colour and marker per strategy, a line style per model if several."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=STRATEGY_STYLES[s][0], marker=STRATEGY_STYLES[s][1], linestyle="", label=STRATEGY_NAMES[s])
        if s is not None or not draft_line
        else Line2D([], [], color=STRATEGY_STYLES[s][0], linewidth=1, label=STRATEGY_NAMES[s])
        for s in strategies
    ]
    handles += list(extra)
    if len(models) > 1:
        handles += [Line2D([], [], color="#555555", linestyle=style, label=model) for model, style in models.items()]
    if below:  # under the panels, clear of a title that spans them; one row unless the figure is narrow
        columns = len(handles) if figure.get_figwidth() >= 12 else (len(handles) + 1) // 2
        figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize="small")
    else:
        figure.legend(handles=handles, loc="outside right upper", fontsize="small")


def gamma_figure(classes: tuple[Any, Any], rows: Sequence[Row], base: int | None) -> Any | None:
    """Gen PPL against γ at the base B2: a line per model × strategy, a horizontal line per model for the draft.

    Returns:
        The matplotlib Figure, or None when no row has a gen PPL to draw.
    """
    figure, axes = _new_axes(classes)
    drawn: list[float] = []
    models = _model_styles(rows)
    strategies: list[str | None] = []
    bars = band = False
    for model, linestyle in models.items():
        model_rows = [r for r in rows if r["model"] == model]
        size = base_size(model_rows, base)
        for strategy in SERIES_ORDER:
            points = sorted(
                (
                    r
                    for r in model_rows
                    if r.get("remask") == strategy and close(r.get("refine_block_size"), size) and finite(r["gen_ppl"])
                ),
                key=lambda r: r["gamma"],
            )
            if points:
                color, marker = STRATEGY_STYLES[strategy]
                xs, ys = [r["gamma"] for r in points], [r["gen_ppl"] for r in points]
                axes.plot(xs, ys, marker=marker, color=color, linestyle=linestyle, label=f"{model}: {strategy}")
                bars |= _error_bars(axes, points, "gamma", color)
                drawn += ys
                strategies.append(strategy)
        draft = draft_row(model_rows)
        if draft is not None and finite(draft.get("gen_ppl")):
            color = STRATEGY_STYLES[None][0]
            axes.axhline(draft["gen_ppl"], color=color, linestyle=linestyle, linewidth=1)
            sem = gen_ppl_sem(draft)
            if sem is not None:  # the draft's ± 1 standard error as a band along its line
                axes.axhspan(max(1.0, draft["gen_ppl"] - sem), draft["gen_ppl"] + sem, color=color, alpha=0.1, lw=0)
                band = True
            drawn.append(draft["gen_ppl"])
            strategies.append(None)
    if not drawn:
        return None
    _log_if_wide(axes, drawn)
    axes.set_xlabel("γ (fraction of generated tokens remasked)")
    axes.set_ylabel(f"gen PPL ({_judge_name(rows)})")
    axes.set_title("γ sweep at the base refine block size (draft: horizontal line)")
    extra = [_bars_handle()] if bars else []
    if band:
        from matplotlib.patches import Patch

        extra.append(Patch(color=STRATEGY_STYLES[None][0], alpha=0.1, lw=0, label="draft ± 1 standard error"))
    _legend(figure, [s for s in STRATEGY_ORDER if s in strategies], models, draft_line=True, extra=extra)
    return figure


def pareto_figure(classes: tuple[Any, Any], rows: Sequence[Row]) -> Any | None:
    """Gen PPL against NFEs per sample for every variant, coloured by strategy; each model's Pareto front joined.

    The front's points are labelled with their variant, next to them (`labels.place_labels`); a label with no free
    place is left out (the NFE table of the report lists every variant).

    Returns:
        The matplotlib Figure, or None when no row has both NFEs and a gen PPL.
    """
    figure, axes = _new_axes(classes)
    drawn: list[float] = []
    models = _model_styles(rows)
    strategies: set[str | None] = set()
    fronts: list[Row] = []
    bars = False
    for model, linestyle in models.items():
        scored = [r for r in rows if r["model"] == model and finite(r.get("gen_ppl")) and finite(r.get("nfes"))]
        for strategy in STRATEGY_ORDER:
            points = [r for r in scored if r.get("remask") == strategy]
            if points:
                color, marker = STRATEGY_STYLES[strategy]
                size = 120 if strategy is None else 30
                axes.scatter(
                    [r["nfes"] for r in points],
                    [r["gen_ppl"] for r in points],
                    color=color,
                    marker=marker,
                    s=size,
                    zorder=3,
                    alpha=0.9,
                )
                bars |= _error_bars(axes, points, "nfes", color)
                strategies.add(strategy)
        front = sorted(
            (scored[i] for i in pareto_front([(r["nfes"], r["gen_ppl"]) for r in scored])), key=lambda r: r["nfes"]
        )
        axes.plot(
            [r["nfes"] for r in front], [r["gen_ppl"] for r in front], color="#555555", linestyle=linestyle, zorder=2
        )
        fronts += front
        drawn += [r["gen_ppl"] for r in scored]
    if not drawn:
        return None
    _log_if_wide(axes, drawn)
    axes.set_xlabel("NFEs per sample (draft + refinement)")
    axes.set_ylabel(f"gen PPL ({_judge_name(rows)})")
    axes.set_title("NFEs against gen PPL (lines: each model's Pareto front)")
    extra = [_bars_handle()] if bars else []
    _legend(figure, [s for s in STRATEGY_ORDER if s in strategies], models, extra=extra)
    place_labels(figure, axes, [PointLabel(r["variant"], r["nfes"], r["gen_ppl"]) for r in fronts])
    return figure


def _draft_setting(row: Row, drafts: Sequence[Row]) -> str:
    """What a draft point was sampled with, as its label: its top-p, and its temperature when the drafts' differ."""
    top_ps = {row.get("top_p") for row in drafts}
    temperatures = {row.get("temperature") for row in drafts}
    parts = []
    if len(top_ps) > 1 or len(temperatures) == 1:
        parts.append(f"top-p {_short(row.get('top_p'))}")
    if len(temperatures) > 1:
        parts.append(f"T {_short(row.get('temperature'))}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    return f"{value:g}" if finite(value) else "?"


def entropy_figure(classes: tuple[Any, Any], rows: Sequence[Row]) -> Any | None:
    """Gen PPL against entropy, one panel per model: the draft frontier as a line, refined variants as points.

    Refined points are coloured by strategy and labelled with their variant, draft points labelled with their top-p
    (and temperature when it varies); every point carries ± 1 standard error of both numbers. A refined point below
    its model's line is better than drafting alone at the same entropy.

    Returns:
        The matplotlib Figure, or None when no model has a draft frontier.
    """
    from matplotlib.lines import Line2D

    models = list(dict.fromkeys(row["model"] for row in rows))
    comparisons = {m: c for m in models if (c := matched_comparison([r for r in rows if r["model"] == m]))}
    if not comparisons:
        return None
    figure_class, canvas_class = classes
    figure = figure_class(figsize=(3 + 4.5 * len(comparisons), 4.5), layout="constrained")
    canvas_class(figure)
    panels = figure.subplots(1, len(comparisons), sharey=True, squeeze=False)[0]
    strategies: set[str | None] = set()
    drawn: list[float] = []
    bars = False
    to_label: list[tuple[Any, list[PointLabel]]] = []
    for axes, (model, comparison) in zip(panels, comparisons.items(), strict=True):
        drafts = [r for r, p in comparison.points if math.isfinite(p.entropy) and math.isfinite(p.gen_ppl)]
        axes.scatter([r["entropy"] for r in drafts], [r["gen_ppl"] for r in drafts], color="#999999", marker="x", s=25)
        bars |= _error_bars(axes, drafts, "entropy", "#999999", with_entropy=True)
        line = _frontier_line(comparison.frontier)
        axes.plot([x for x, _ in line], [y for _, y in line], color="#555555", zorder=2)
        base = next((r for r in drafts if not r.get("draft_frontier")), None)
        if base is not None:
            color, marker = STRATEGY_STYLES[None]
            axes.scatter([base["entropy"]], [base["gen_ppl"]], color=color, marker=marker, s=120, zorder=3)
            strategies.add(None)
        drawn += [r["gen_ppl"] for r in drafts]
        labels = []
        for strategy in (*SERIES_ORDER, "edit"):
            points = [r for r, _ in comparison.variants if r.get("remask") == strategy]
            points = [r for r in points if finite(r.get("entropy")) and finite(r.get("gen_ppl"))]
            if points:
                color, marker = STRATEGY_STYLES[strategy]
                xs, ys = [r["entropy"] for r in points], [r["gen_ppl"] for r in points]
                axes.scatter(xs, ys, color=color, marker=marker, s=30, zorder=3)
                bars |= _error_bars(axes, points, "entropy", color, with_entropy=True)
                strategies.add(strategy)
                drawn += ys
                labels += [PointLabel(r["variant"], r["entropy"], r["gen_ppl"]) for r in points]
        labels += [PointLabel(_draft_setting(r, drafts), r["entropy"], r["gen_ppl"], "#555555") for r in drafts]
        axes.set_title(model, fontsize="medium")
        axes.set_xlabel("entropy (nats, mean per sample)")
        to_label.append((axes, labels))
    _log_if_wide(panels[0], drawn)
    panels[0].set_ylabel(f"gen PPL ({_judge_name(rows)})")
    figure.suptitle("Gen PPL against entropy: below the line is better than drafting alone")
    extra = [
        Line2D([], [], color="#999999", marker="x", linestyle="", label="draft at other top-p / T (grey labels)"),
        Line2D([], [], color="#555555", label="draft frontier"),
        *([_bars_handle()] if bars else []),
    ]
    _legend(figure, [s for s in STRATEGY_ORDER if s in strategies], {}, extra=extra, below=True)
    for axes, labels in to_label:  # after the legend and shared axis are set, so the layout is final
        place_labels(figure, axes, labels)
    return figure


def _frontier_line(frontier: Sequence[FrontierPoint], steps: int = 16) -> list[tuple[float, float]]:
    """Points along the frontier as `match_entropy` interpolates it (geometric between neighbours), for drawing."""
    line = [(frontier[0].entropy, frontier[0].gen_ppl)] if frontier else []
    for a, b in zip(frontier, frontier[1:], strict=False):
        for k in range(1, steps + 1):
            w = k / steps
            line.append((a.entropy + w * (b.entropy - a.entropy), a.gen_ppl ** (1 - w) * b.gen_ppl**w))
    return line


def save_figure(figure: Any | None, path: Path) -> bool:
    """Write a figure as PNG, atomically; False when there was nothing to draw."""
    if figure is None:
        return False
    _save(figure, path)
    return True


def _log_if_wide(axes: Any, values: list[float]) -> None:
    # γ → 1 can blow gen PPL up by orders of magnitude; a log axis keeps the U's bottom readable.
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 10:
        axes.set_yscale("log")


def _judge_name(rows: Sequence[Row]) -> str:
    name = str((rows[0].get("judge") or {}).get("name", "judge")) if rows else "judge"
    return Path(name).name or name  # a judge folder is named by its last component


def _save(figure: Any, path: Path) -> None:
    write_atomically(path, lambda staging: figure.savefig(staging, dpi=150, format="png"))

"""Writing the sweep's report: `report.md` and its PNG plots into the sweep folder, atomically.

The text comes from `tables.render_report`, the pictures from `plots`; a plot of earlier rows never outlives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from did_cli.ablation.matched import verdict_line
from did_cli.ablation.plots import entropy_figure, figure_classes, gamma_figure, pareto_figure, save_figure
from did_cli.ablation.results import RESULTS, latest_rows, read_results
from did_cli.ablation.rows import Row, is_exact
from did_cli.ablation.tables import render_report
from did_cli.files import write_atomically

__all__ = ["ENTROPY_PLOT", "GAMMA_PLOT", "NO_PLOTS", "PARETO_PLOT", "REPORT", "ReportResult", "write_report"]

REPORT = "report.md"
GAMMA_PLOT = "gamma_curve.png"
PARETO_PLOT = "nfe_pareto.png"
ENTROPY_PLOT = "entropy_frontier.png"
NO_PLOTS = "Plots skipped: matplotlib is not installed (pip install 'did[plots]')."


@dataclass
class ReportResult:
    """The written report, its plots, a one-line note when plots were skipped, and each model's verdict line."""

    path: Path
    plots: list[Path] = field(default_factory=list)
    note: str | None = None
    verdicts: list[str] = field(default_factory=list)


def write_report(
    out: str | Path,
    rows: Sequence[Row] | None = None,
    *,
    base_gamma: float = 0.5,
    base_refine_block_size: int | None = None,
    plots: bool = True,
) -> ReportResult:
    """Write `report.md` (and the PNG plots when matplotlib is there) into the sweep folder `out`.

    Args:
        out: the sweep folder; the report and plots are replaced atomically.
        rows: the rows to report; by default the latest row per (model, variant) of `out/results.jsonl`.
        base_gamma: γ where the strategy ablation and the B2 sweep are read.
        base_refine_block_size: B2 where the strategy ablation and the γ sweep are read (None: L, global).
        plots: draw the plots (when matplotlib is importable).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = latest_rows(read_results(out / RESULTS)) if rows is None else list(rows)
    written: list[Path] = []
    note = None
    classes = figure_classes() if plots else None
    if plots and classes is None:
        note = NO_PLOTS
    elif classes is not None:
        paper = [r for r in rows if not r.get("draft_frontier")]
        if save_figure(
            gamma_figure(classes, [r for r in paper if is_exact(r)], base_refine_block_size), out / GAMMA_PLOT
        ):
            written.append(out / GAMMA_PLOT)
        if save_figure(pareto_figure(classes, paper), out / PARETO_PLOT):
            written.append(out / PARETO_PLOT)
        if save_figure(entropy_figure(classes, rows), out / ENTROPY_PLOT):
            written.append(out / ENTROPY_PLOT)
    text = render_report(
        rows,
        base_gamma=base_gamma,
        base_refine_block_size=base_refine_block_size,
        plots=[p.name for p in written],
        note=note,
    )
    path = out / REPORT
    write_atomically(path, lambda staging: staging.write_text(text, encoding="utf-8"))
    if classes is not None:
        for name in (GAMMA_PLOT, PARETO_PLOT, ENTROPY_PLOT):  # a plot of earlier rows must not outlive them
            if out / name not in written:
                (out / name).unlink(missing_ok=True)
    by_model = {row["model"]: [r for r in rows if r["model"] == row["model"]] for row in rows}
    verdicts = [line for model_rows in by_model.values() if (line := verdict_line(model_rows))]
    return ReportResult(path, written, note, verdicts)

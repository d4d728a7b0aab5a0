"""Reading sweep result rows: which row is the draft or an exact refinement, and rows' numbers as table cells.

Shared by the report's tables (`tables`), its entropy-matched section (`matched`) and its plots (`plots`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Row = dict[str, Any]

# Table order of the strategy ablation (the paper's), and of the series in the γ and B2 tables.
ABLATION_ORDER = (None, "random", "posthoc", "snapshot")
# The strategies beyond the paper's (`did_cli.sampling.remask`), and editing.
MORE_STRATEGIES = ("snapshot-entropy", "snapshot-margin", "energy", "mc-dropout", "mc-variance", "noise-ensemble")
SERIES_ORDER = ("snapshot", "posthoc", "random", *MORE_STRATEGIES)
# Every kind of row, in legend order: the paper's table, then the other measures, then editing.
STRATEGY_ORDER = (*ABLATION_ORDER, *MORE_STRATEGIES, "edit")
STRATEGY_NAMES = {
    None: "none (draft only)",
    "random": "random",
    "posthoc": "post-hoc",
    "snapshot": "snapshot",
    **{name: name for name in MORE_STRATEGIES},
    "edit": "edit (no remasking)",
}


def is_exact(row: Row) -> bool:
    """Whether a row is the draft or an exact refinement (rows written before cheaper refinements existed are)."""
    return row.get("confidence_threshold") is None and (row.get("refine_cache") or 1) == 1


def has_mauve(rows: Sequence[Row]) -> bool:
    """Whether any row has MAUVE against a reference."""
    return any(isinstance(r.get("mauve"), dict) for r in rows)


def mauve_cell(row: Row) -> str:
    """MAUVE against the sweep's reference (higher is closer to it), or — when not computed."""
    mauve = row.get("mauve")
    return num(mauve.get("mauve"), 3) if isinstance(mauve, dict) else "—"


def markdown_table(headers: list[str], body: list[list[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join([":---"] + ["---:"] * (len(headers) - 1)) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def draft_row(rows: Sequence[Row]) -> Row | None:
    """The first draft row (no refinement), or None."""
    return next((r for r in rows if r.get("remask") is None), None)


def best_row(rows: list[Row]) -> Row | None:
    """The row with the lowest gen PPL when at least two are scored (a single row is best of nothing), else None."""
    scored = [r for r in rows if finite(r.get("gen_ppl"))]
    return min(scored, key=lambda r: r["gen_ppl"]) if len(scored) > 1 else None


def base_size(rows: Sequence[Row], base: int | None) -> int:
    """The base B2 resolved against the rows' length: None (and anything longer) is one global block, L."""
    length = rows[0]["length"]
    return length if base is None else min(base, length)


def size_cell(value: int, length: int) -> str:
    """A B2 as a cell: `L (global)` for one global block."""
    return f"{value} (global)" if value >= length else str(value)


def ppl_cell(row: Row | None, bold: bool = False) -> str:
    """A row's gen PPL ± its standard error as a cell (— when not scored)."""
    if row is None or not finite(row.get("gen_ppl")):
        return "—"
    sem = row.get("gen_ppl_sem")
    text = f"{row['gen_ppl']:.2f}" + (f" ± {sem:.2f}" if finite(sem) else "")
    return f"**{text}**" if bold else text


def num(value: Any, digits: int) -> str:
    """A number as a cell with `digits` decimals (— when missing or not finite)."""
    return f"{value:.{digits}f}" if finite(value) else "—"


def finite(value: Any) -> bool:
    """Whether `value` is a finite number (rows hold null for undefined numbers)."""
    return isinstance(value, int | float) and math.isfinite(value)


def sort_value(value: Any) -> float:
    """A sort key that puts missing numbers last."""
    return value if finite(value) else math.inf


def close(value: Any, target: float) -> bool:
    """Whether a row's number equals `target` up to float rounding."""
    return finite(value) and math.isclose(value, target, rel_tol=1e-9, abs_tol=1e-12)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has both cost <= and value <= with one of them smaller.

    Args:
        points: (cost, value) pairs, both to be minimised (NFEs, gen PPL).
    """

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]

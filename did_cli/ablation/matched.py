"""The sweep's entropy-matched view: each model's refined variants read against its draft frontier, as report text.

`matched_comparison` turns one model's rows into points for `entropy_matched` (the pure math); `matched_section`
renders the frontier and difference tables and `verdict_line` the one-line verdict the CLI prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from did_cli.ablation.entropy_matched import (
    BEATS,
    WORSE,
    FrontierPoint,
    Matched,
    PerSample,
    draft_frontier,
    match_entropy,
    verdict,
)
from did_cli.ablation.rows import Row, finite, has_mauve, markdown_table, mauve_cell, num, ppl_cell, sort_value

__all__ = ["MatchedComparison", "matched_comparison", "matched_section", "verdict_line"]

# --- Entropy-matched comparison: pure --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchedComparison:
    """One model's refined variants against its draft frontier (see did_cli.ablation.entropy_matched).

    Attributes:
        points: every draft point (the sweep's draft and the frontier's drafts), ascending in entropy.
        frontier: the points on the frontier (no other draft has entropy >= and gen PPL <=).
        variants: each refined row with its Matched, in row order.
    """

    points: list[tuple[Row, FrontierPoint]]
    frontier: list[FrontierPoint]
    variants: list[tuple[Row, Matched]]


def _point(row: Row) -> FrontierPoint:
    entropy, gen_ppl = row.get("entropy"), row.get("gen_ppl")
    per_sample = row.get("per_sample")
    samples = None
    if isinstance(per_sample, dict):
        try:
            samples = PerSample(
                tuple(_hashable(i) for i in per_sample["id"]),
                tuple(math.nan if v is None else float(v) for v in per_sample["ppl"]),
                tuple(math.nan if v is None else float(v) for v in per_sample["entropy"]),
            )
        except (KeyError, TypeError, ValueError):
            samples = None  # a row edited by hand or cut short: the point stands, its standard error does not
    return FrontierPoint(
        str(row.get("variant")),
        float(entropy) if finite(entropy) else math.nan,
        float(gen_ppl) if finite(gen_ppl) else math.nan,
        samples,
    )


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def matched_comparison(rows: Sequence[Row]) -> MatchedComparison | None:
    """One model's rows as an entropy-matched comparison, or None without a draft frontier (a single draft point).

    Args:
        rows: one model's results rows: its draft, the frontier's drafts (`draft_frontier`) and refined variants.
    """
    drafts = [r for r in rows if r.get("remask") is None]
    if not any(r.get("draft_frontier") for r in drafts):
        return None
    points = sorted(((r, _point(r)) for r in drafts), key=lambda pair: sort_value(pair[1].entropy))
    frontier = draft_frontier([p for _, p in points])
    variants = [(r, match_entropy(_point(r), frontier)) for r in rows if r.get("remask") is not None]
    return MatchedComparison(points, frontier, variants)


def _difference(matched: Matched) -> str:
    if matched.difference is None or matched.frontier_gen_ppl is None:
        return "—"
    text = f"{matched.difference:+.2f}"
    if matched.sem is not None and math.isfinite(matched.sem):
        text += f" ± {matched.sem:.2f}"
    if matched.frontier_gen_ppl:
        text += f" ({100 * matched.difference / matched.frontier_gen_ppl:+.0f} %)"
    return text


def _reading(row: Row, matched: Matched) -> str:
    """What the comparison says about one variant, in words."""
    if matched.status in ("below", "above") and matched.range is not None:
        low, high = matched.range
        side = (
            f"below the frontier's lowest entropy ({low:.3f})"
            if matched.status == "below"
            else (f"above its highest ({high:.3f})")
        )
        return f"not matched: entropy {row.get('entropy', math.nan):.3f} is {side}"
    result = verdict(matched)
    if result is None:
        return "not matched: no scored frontier"
    if result == BEATS:
        return f"**beats** the frontier by {-matched.difference:.2f}"  # type: ignore[operator]
    if result == WORSE:
        return f"worse than the frontier by {matched.difference:.2f}"
    return "within noise of the frontier" if matched.bound is not None else "no standard error: no verdict"


def matched_section(rows: list[Row]) -> list[str]:
    """The report's "Gen PPL at matched entropy" section for one model (empty without a draft frontier)."""
    comparison = matched_comparison(rows)
    if comparison is None:
        return []
    on_frontier = {id(p) for p in comparison.frontier}
    mauve = has_mauve(rows)
    draft_body = [
        [
            "draft (refined by every variant)" if not row.get("draft_frontier") else row["variant"],
            num(row.get("top_p"), 3),
            num(row.get("temperature"), 3),
            ppl_cell(row),
            num(row.get("entropy"), 3),
            *([mauve_cell(row)] if mauve else []),
            "●" if id(point) in on_frontier else "",
        ]
        for row, point in comparison.points
    ]
    variant_body = [
        [
            row["variant"],
            num(row.get("entropy"), 3),
            ppl_cell(row),
            *([mauve_cell(row)] if mauve else []),
            num(matched.frontier_gen_ppl, 2),
            _difference(matched),
            _reading(row, matched),
        ]
        for row, matched in comparison.variants
    ]
    maybe = ["MAUVE"] if mauve else []
    return [
        "### Gen PPL at matched entropy",
        "The draft frontier: drafts from the same model and seed, sampled sharper or flatter (top-p, temperature). "
        "● marks the drafts no other draft beats on both entropy and gen PPL; joined by straight lines in log gen "
        "PPL they are the frontier.",
        markdown_table(["draft", "top-p", "temperature", "gen PPL", "entropy", *maybe, "frontier"], draft_body),
        markdown_table(
            ["variant", "entropy", "gen PPL", *maybe, "frontier at its entropy", "difference", "reading"],
            variant_body,
        ),
        "**Difference** is the variant's gen PPL minus the frontier's at the variant's entropy (interpolated in log "
        "gen PPL; negative: better than drafting alone at the same diversity), ± its standard error by the delta "
        "method over per-sample values, samples paired by id, entropies' noise included; **beats** / **worse**: "
        "outside the two-sided 95 % interval (Student's t with n − 1 degrees of freedom times the standard error). "
        "A variant outside the frontier's entropy range is not compared (no extrapolation): widen the frontier with "
        "lower or higher `--top-p` / `--temperature` values.",
    ]


def verdict_line(rows: list[Row]) -> str | None:
    """One line per model: which refined variants beat the frontier and by how much, and what could not be read."""
    comparison = matched_comparison(rows)
    if comparison is None or not comparison.variants:
        return None
    model = rows[0]["model"]
    groups: dict[str | None, list[tuple[Row, Matched]]] = {}
    for row, matched in comparison.variants:
        groups.setdefault(verdict(matched), []).append((row, matched))
    parts = []
    beats = sorted(groups.get(BEATS, []), key=lambda pair: pair[1].difference or 0.0)
    if beats:
        listed = ", ".join(f"{row['variant']} by {-m.difference:.2f} ± {m.sem:.2f}" for row, m in beats)  # type: ignore[operator]
        verb = "beats" if len(beats) == 1 else "beat"
        parts.append(f"{len(beats)} {verb} the draft frontier at matched entropy ({listed} gen PPL)")
    else:
        parts.append("none beats the draft frontier at matched entropy")
    worse = groups.get(WORSE, [])
    if worse:
        parts.append(f"{len(worse)} worse ({', '.join(row['variant'] for row, _ in worse)})")
    within = [pair for key, pairs in groups.items() if key not in (BEATS, WORSE, None) for pair in pairs]
    unknown = [row["variant"] for row, m in within if m.bound is None]
    within = [row["variant"] for row, m in within if m.bound is not None]
    if within:
        parts.append(f"{len(within)} within noise ({', '.join(within)})")
    if unknown:
        parts.append(
            f"{len(unknown)} without a standard error ({', '.join(unknown)}: fewer than 2 samples, or rows from an "
            "older did without per-sample values)"
        )
    outside = groups.get(None, [])
    if outside:
        parts.append(
            f"{len(outside)} outside the frontier's entropy range ({', '.join(r['variant'] for r, _ in outside)})"
        )
    total = len(comparison.variants)
    return f"{model} ({total} refined variant{'s' if total != 1 else ''}): " + "; ".join(parts) + "."

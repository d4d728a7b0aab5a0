"""The sweep's results file and report: `results.jsonl` rows in, `report.md` with the paper's tables and PNG plots out.

One section per model holds the paper's ablations (research notes §1.2–1.4, §3.2): the remask strategy ablation
(none / random / post-hoc / snapshot at the base γ and B2), the γ sweep, the refine block size (B2) sweep and NFEs
against gen PPL, with entropy beside every gen PPL because repetitive text earns a low perplexity; cheaper
refinements (confidence-threshold commits, reused kept keys/values) get their own table of draft and refine
seconds against the share of the exact refinement's gen PPL gain they keep. With several
models a side-by-side strategy table comes first. The paper's published numbers are quoted under the tables they
belong to.

Plots (the γ U-curve and the NFE–quality Pareto plot) need matplotlib, the `plots` extra; without it the report is
written without them and says so in one line. Figures are drawn on matplotlib's Agg canvas directly, never through
pyplot, so a caller's interactive backend and global figure state are left alone.

Layout: reading and appending rows, then pure table rendering, then plots, then `write_report`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from did_cli.entropy_matched import (
    BEATS,
    WORSE,
    FrontierPoint,
    Matched,
    PerSample,
    draft_frontier,
    match_entropy,
    verdict,
)
from did_cli.files import write_atomically

__all__ = [
    "REPORT",
    "RESULTS",
    "ReportResult",
    "STRATEGY_STYLES",
    "append_result",
    "entropy_figure",
    "matched_comparison",
    "gamma_figure",
    "is_exact",
    "latest_rows",
    "pareto_figure",
    "pareto_front",
    "read_results",
    "render_report",
    "write_report",
]

RESULTS = "results.jsonl"
REPORT = "report.md"
GAMMA_PLOT = "gamma_curve.png"
PARETO_PLOT = "nfe_pareto.png"
ENTROPY_PLOT = "entropy_frontier.png"
NO_PLOTS = "Plots skipped: matplotlib is not installed (pip install 'did[plots]')."

# Table order of the strategy ablation (the paper's), and of the series in the γ and B2 tables.
_ABLATION_ORDER = (None, "random", "posthoc", "snapshot")
_SERIES_ORDER = ("snapshot", "posthoc", "random")
_NAMES = {None: "none (draft only)", "random": "random", "posthoc": "post-hoc", "snapshot": "snapshot"}
# The paper's strategy ablation (110M model, OWT, L = 1024, GPT-2 Large judge; research notes §1.2).
_PAPER_STRATEGY = {None: 27.36, "random": 30.26, "posthoc": 29.85, "snapshot": 21.85}
Row = dict[str, Any]


# --- results.jsonl ----------------------------------------------------------------------------------------------------


def read_results(path: str | Path) -> list[Row]:
    """Rows of a results file in order; a missing file is empty and a line cut short by an interrupt is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_result(path: str | Path, row: Row) -> None:
    """Append one row as a JSON line and flush it, so an interrupted sweep keeps every finished score."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        # A line cut short by an interrupt has no newline; end it so the new row starts on its own line.
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(handle.tell() - 1)
            if handle.read(1) != "\n":
                handle.write("\n")
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


def latest_rows(rows: Sequence[Row]) -> list[Row]:
    """The last row per (model, variant), in first-seen order: a re-run with other settings supersedes older rows."""
    latest: dict[tuple[Any, Any], Row] = {}
    for row in rows:
        # Assigning to an existing key keeps its place, so the order is that of first appearance.
        latest[(row.get("model"), row.get("variant"))] = row
    return list(latest.values())


# --- Tables: pure -----------------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has both cost <= and value <= with one of them smaller.

    Args:
        points: (cost, value) pairs, both to be minimised (NFEs, gen PPL).
    """

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]


def render_report(
    rows: Sequence[Row],
    *,
    base_gamma: float = 0.5,
    base_refine_block_size: int | None = None,
    plots: Sequence[str] = (),
    note: str | None = None,
) -> str:
    """The Markdown report for sweep rows (one per model and variant).

    Args:
        rows: results rows, e.g. `latest_rows(read_results(...))`.
        base_gamma: γ where the strategy ablation and the B2 sweep are read.
        base_refine_block_size: B2 where the strategy ablation and the γ sweep are read (None: L, global).
        plots: file names of plots to embed, relative to the report.
        note: one line shown where the plots would be (e.g. why there are none).
    """
    models = list(dict.fromkeys(row["model"] for row in rows))
    by_model = {model: [row for row in rows if row["model"] == model] for model in models}
    # Drafts of the draft frontier only serve the entropy-matched comparison; the paper's tables never see them.
    paper = {
        model: [row for row in model_rows if not row.get("draft_frontier")] for model, model_rows in by_model.items()
    }
    parts = ["# DiD ablation sweep", _header(rows), _LEGEND]
    reference = next((r["mauve"] for r in rows if isinstance(r.get("mauve"), dict)), None)
    if reference is not None:
        parts.append(
            f"**MAUVE** (Pillutla et al. 2021) against `{reference.get('reference')}` (sha256 "
            f"{str(reference.get('reference_sha256'))[:12]}), from the judge's final-layer features, texts cut to "
            f"{reference.get('max_tokens')} judge tokens: 1 means indistinguishable from the reference, higher is "
            "closer."
        )
    verdicts = [line for model_rows in by_model.values() if (line := _verdict_line(model_rows))]
    if verdicts:
        parts += ["## Verdict at matched entropy", "\n".join(f"- {line}" for line in verdicts)]
    if len(models) > 1:
        parts += [
            "## Models side by side: remask strategy",
            _side_by_side(paper, base_gamma, base_refine_block_size),
        ]
    for model, model_rows in by_model.items():
        size = _base_size(model_rows, base_refine_block_size)
        parts += _model_section(model, paper[model], base_gamma, size)
        parts += _matched_section(model_rows)
    if plots or note:
        parts.append("## Plots")
        parts += [f"![{name}]({name})" for name in plots]
        if note:
            parts.append(note)
    return "\n\n".join(parts) + "\n"


_LEGEND = (
    "How to read: **gen PPL** is the mean of per-sample perplexities under the judge (the published aggregate), "
    "± its standard error over samples; lower is better, but only at comparable **entropy** (mean unigram entropy "
    "of a sample's judge tokens, nats), since repetitive text earns a low perplexity. **NFEs** are model calls per "
    "sample, draft and refinement together (post-hoc's scoring pass counts one); seconds likewise. Every variant "
    "refines the same drafts with the same random streams, so differences come from the settings."
)


def _header(rows: Sequence[Row]) -> str:
    if not rows:
        return "No results yet."
    config = rows[0].get("config", {})
    judge = (rows[0].get("judge") or {}).get("name", config.get("judge"))
    unmasking = config.get("unmasking", {})
    return (
        f"Judge `{judge}` · {config.get('num_samples')} samples per variant · seed {config.get('seed')} · "
        f"{unmasking.get('order')} unmasking, top-p {unmasking.get('top_p')}, temperature "
        f"{unmasking.get('temperature')} · {config.get('dtype')}"
    )


def _model_section(model: str, all_rows: list[Row], base_gamma: float, base_size: int) -> list[str]:
    rows = [r for r in all_rows if is_exact(r)]  # the paper's ablations; cheaper refinements have their own table
    first = all_rows[0]
    length = first["length"]
    sha = (first.get("config", {}).get("sha256") or "")[:12]
    where = f"B2 = L = {length}" if base_size >= length else f"B2 = {base_size}"
    return [
        f"## {model}",
        f"`{first.get('model_path')}` (weights {sha or 'unknown'}) · L = {length} · draft block size B1 = "
        f"{first.get('draft_block_size')}",
        f"### Remask strategy (γ = {base_gamma:g}, {where})",
        _strategy_table(rows, base_gamma, base_size),
        "Paper (110M, OWT, L = 1024, GPT-2 Large judge): snapshot 21.85 < none 27.36 < post-hoc 29.85 < random "
        "30.26. Compare the ordering, not the values.",
        f"### γ sweep ({where})",
        _series_table(rows, "γ", "gamma", lambda r: _close(r.get("refine_block_size"), base_size), str),
        "Paper: U-shaped, best at γ = 0.25–0.5, exploding as γ → 1 (no numbers published).",
        f"### Refine block size B2 (γ = {base_gamma:g})",
        _series_table(
            rows, "B2", "refine_block_size", lambda r: _close(r.get("gamma"), base_gamma), lambda v: _size(v, length)
        ),
        "Paper: only a global block (B2 = L) helps; small refine blocks hurt against no refinement (no numbers "
        "published).",
        "### NFEs against gen PPL",
        _nfe_table(all_rows),
        "Pareto: ● marks the variants no other variant of this model beats on both NFEs and gen PPL.",
        *_cheaper_section(all_rows),
    ]


def is_exact(row: Row) -> bool:
    """Whether a row is the draft or an exact refinement (rows written before cheaper refinements existed are)."""
    return row.get("confidence_threshold") is None and (row.get("refine_cache") or 1) == 1


def _cheaper_section(rows: list[Row]) -> list[str]:
    """Cheaper refinements against the exact one they approximate: time split, NFEs and kept gen PPL gain.

    A variant's reference is the exact refinement at its strategy, γ and B2; for threshold variants, the
    one-token-per-call confidence order (threshold 1, R = 1) when the sweep has it, since they share that order.
    """
    cheaper = [r for r in rows if not is_exact(r)]
    if not cheaper:
        return []
    draft = _draft(rows)

    def same_point(a: Row, b: Row) -> bool:
        return (
            a.get("remask") == b.get("remask")
            and _close(a.get("gamma"), b.get("gamma"))
            and a.get("refine_block_size") == b.get("refine_block_size")
        )

    def reference(row: Row) -> Row | None:
        exact = [r for r in rows if r.get("remask") is not None and (r.get("refine_cache") or 1) == 1]
        exact = [r for r in exact if same_point(r, row)]
        if row.get("confidence_threshold") is not None:
            one_by_one = next((r for r in exact if _close(r.get("confidence_threshold"), 1.0)), None)
            if one_by_one is not None and one_by_one is not row:
                return one_by_one
        return next((r for r in exact if r.get("confidence_threshold") is None), None)

    references = [
        r for r in rows if is_exact(r) and r.get("remask") is not None and any(same_point(r, c) for c in cheaper)
    ]
    head = [_cheaper_cells(draft, draft, None)] if draft is not None else []
    head += [_cheaper_cells(r, draft, r) for r in references]
    body = [
        _cheaper_cells(row, draft, reference(row))
        for row in sorted(cheaper, key=lambda r: _sort_value(r.get("refine_seconds")))
    ]
    headers = [
        "variant",
        "threshold",
        "R",
        "refine NFEs / sample",
        "draft s / sample",
        "refine s / sample",
        "refine ÷ draft time",
        "gen PPL",
        "entropy",
        "exact gain kept",
        "against",
    ]
    return [
        "### Cheaper refinement: time against quality",
        _table(headers, head + body),
        "Threshold variants commit, per call, every remasked position whose sampled token's probability exceeds the "
        "threshold, and at least the most confident one (confidence order: a threshold of 1 is one token per call); "
        "R reuses kept positions' keys/values for R calls of the global block. **Exact gain kept** is (draft gen PPL "
        "− variant) / (draft − reference), the reference being the exact refinement, or for threshold variants the "
        "one-token-per-call confidence order (threshold 1) when it was run. The issue's goal: refine time ≤ draft time "
        "at ≥ 90 %. Seconds are wall-clock, so on a shared machine they carry its load.",
    ]


def _cheaper_cells(row: Row, draft: Row | None, exact: Row | None) -> list[str]:
    kept = "—"
    if draft is not None and exact is not None and row is not draft:
        base, best, value = draft.get("gen_ppl"), exact.get("gen_ppl"), row.get("gen_ppl")
        if _finite(base) and _finite(best) and _finite(value) and base != best:
            kept = f"{100 * (base - value) / (base - best):.0f} %"
    threshold = row.get("confidence_threshold")
    draft_seconds, refine_seconds = row.get("draft_seconds"), row.get("refine_seconds")
    timed = row.get("remask") is not None and _finite(refine_seconds) and _finite(draft_seconds) and draft_seconds
    ratio = refine_seconds / draft_seconds if timed else None
    name = "draft (no refinement)" if row.get("remask") is None else row["variant"]
    against = "—" if exact is None or exact is row or row is draft else exact["variant"]
    return [
        name,
        "—" if threshold is None else f"{threshold:g}",
        str(row.get("refine_cache") or 1) if row.get("remask") is not None else "—",
        _num(row.get("refine_nfes"), 1),
        _num(draft_seconds, 3),
        _num(refine_seconds, 3) if row.get("remask") is not None else "—",
        _num(ratio, 2),
        _ppl(row),
        _num(row.get("entropy"), 3),
        kept,
        against,
    ]


# --- Entropy-matched comparison: pure --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchedComparison:
    """One model's refined variants against its draft frontier (see did_cli.entropy_matched).

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
        float(entropy) if _finite(entropy) else math.nan,
        float(gen_ppl) if _finite(gen_ppl) else math.nan,
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
    points = sorted(((r, _point(r)) for r in drafts), key=lambda pair: _sort_value(pair[1].entropy))
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


def _matched_section(rows: list[Row]) -> list[str]:
    comparison = matched_comparison(rows)
    if comparison is None:
        return []
    on_frontier = {id(p) for p in comparison.frontier}
    mauve = _has_mauve(rows)
    draft_body = [
        [
            "draft (refined by every variant)" if not row.get("draft_frontier") else row["variant"],
            _num(row.get("top_p"), 3),
            _num(row.get("temperature"), 3),
            _ppl(row),
            _num(row.get("entropy"), 3),
            *([_mauve(row)] if mauve else []),
            "●" if id(point) in on_frontier else "",
        ]
        for row, point in comparison.points
    ]
    variant_body = [
        [
            row["variant"],
            _num(row.get("entropy"), 3),
            _ppl(row),
            *([_mauve(row)] if mauve else []),
            _num(matched.frontier_gen_ppl, 2),
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
        _table(["draft", "top-p", "temperature", "gen PPL", "entropy", *maybe, "frontier"], draft_body),
        _table(
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


def _verdict_line(rows: list[Row]) -> str | None:
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


def _strategy_table(rows: list[Row], base_gamma: float, base_size: int) -> str:
    body = []
    for strategy in _ABLATION_ORDER:
        row = _ablation_row(rows, strategy, base_gamma, base_size)
        if row is not None:
            body.append(
                [
                    _NAMES[strategy],
                    _ppl(row),
                    _num(row.get("entropy"), 3),
                    _num(row.get("nfes"), 1),
                    str(row.get("num_degenerate")),
                    f"{_PAPER_STRATEGY[strategy]:.2f}",
                ]
            )
    return _table(["refinement", "gen PPL", "entropy", "NFEs / sample", "degenerate", "paper gen PPL"], body)


def _side_by_side(by_model: dict[str, list[Row]], base_gamma: float, base_refine_block_size: int | None) -> str:
    headers = ["refinement"] + [f"{model} {what}" for model in by_model for what in ("gen PPL", "entropy")]
    body = []
    for strategy in _ABLATION_ORDER:
        cells = [_NAMES[strategy]]
        for rows in by_model.values():
            row = _ablation_row(rows, strategy, base_gamma, _base_size(rows, base_refine_block_size))
            cells += [_ppl(row), _num(row.get("entropy") if row else None, 3)]
        body.append(cells)
    return _table(headers, body)


def _ablation_row(rows: list[Row], strategy: str | None, base_gamma: float, base_size: int) -> Row | None:
    if strategy is None:
        return _draft(rows)
    return next(
        (
            r
            for r in rows
            if r.get("remask") == strategy
            and _close(r.get("gamma"), base_gamma)
            and _close(r.get("refine_block_size"), base_size)
        ),
        None,
    )


def _series_table(
    rows: list[Row], axis: str, key: str, on_slice: Callable[[Row], bool], label: Callable[[Any], str]
) -> str:
    """One row per value of `key` on the slice, a (gen PPL, entropy) column pair per swept strategy; best in bold.

    Strategies with a single value on the slice (run at the base point only) are left out unless none has more.
    """
    refined = [r for r in rows if r.get("remask") is not None and on_slice(r)]
    strategies = [s for s in _SERIES_ORDER if any(r["remask"] == s for r in refined)]
    # A strategy run only at the base point is in the strategy table; here it would be one value among dashes.
    swept = [s for s in strategies if len({r[key] for r in refined if r["remask"] == s}) > 1]
    strategies = swept or strategies
    refined = [r for r in refined if r["remask"] in strategies]
    values = sorted({r[key] for r in refined})
    headers = [axis] + [f"{_NAMES[s]} {what}" for s in strategies for what in ("gen PPL", "entropy")]
    best = {s: _best([r for r in refined if r["remask"] == s]) for s in strategies}
    body = []
    draft = _draft(rows)
    if draft is not None:
        body.append(
            ["draft (no refinement)"] + [c for _ in strategies for c in (_ppl(draft), _num(draft.get("entropy"), 3))]
        )
    for value in values:
        cells = [label(value)]
        for s in strategies:
            row = next((r for r in refined if r["remask"] == s and r[key] == value), None)
            cells += [_ppl(row, bold=row is not None and row is best[s]), _num(row.get("entropy") if row else None, 3)]
        body.append(cells)
    return _table(headers, body)


def _nfe_table(rows: list[Row]) -> str:
    ordered = sorted(rows, key=lambda r: (_sort_value(r.get("nfes")), _sort_value(r.get("gen_ppl"))))
    scored = [r for r in ordered if _finite(r.get("gen_ppl")) and _finite(r.get("nfes"))]
    front = {id(scored[i]) for i in pareto_front([(r["nfes"], r["gen_ppl"]) for r in scored])}
    mauve = _has_mauve(rows)
    body = [
        [
            r["variant"],
            _num(r.get("nfes"), 1),
            _num(r.get("seconds"), 3),
            _ppl(r),
            _num(r.get("entropy"), 3),
            *([_mauve(r)] if mauve else []),
            "●" if id(r) in front else "",
        ]
        for r in ordered
    ]
    headers = ["variant", "NFEs / sample", "seconds / sample", "gen PPL", "entropy", *(["MAUVE"] if mauve else [])]
    return _table([*headers, "Pareto"], body)


def _has_mauve(rows: Sequence[Row]) -> bool:
    return any(isinstance(r.get("mauve"), dict) for r in rows)


def _mauve(row: Row) -> str:
    """MAUVE against the sweep's reference (higher is closer to it), or — when not computed."""
    mauve = row.get("mauve")
    return _num(mauve.get("mauve"), 3) if isinstance(mauve, dict) else "—"


def _table(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join([":---"] + ["---:"] * (len(headers) - 1)) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _draft(rows: Sequence[Row]) -> Row | None:
    return next((r for r in rows if r.get("remask") is None), None)


def _best(rows: list[Row]) -> Row | None:
    scored = [r for r in rows if _finite(r.get("gen_ppl"))]
    return min(scored, key=lambda r: r["gen_ppl"]) if len(scored) > 1 else None


def _base_size(rows: Sequence[Row], base: int | None) -> int:
    length = rows[0]["length"]
    return length if base is None else min(base, length)


def _size(value: int, length: int) -> str:
    return f"{value} (global)" if value >= length else str(value)


def _ppl(row: Row | None, bold: bool = False) -> str:
    if row is None or not _finite(row.get("gen_ppl")):
        return "—"
    sem = row.get("gen_ppl_sem")
    text = f"{row['gen_ppl']:.2f}" + (f" ± {sem:.2f}" if _finite(sem) else "")
    return f"**{text}**" if bold else text


def _num(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "—"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _sort_value(value: Any) -> float:
    return value if _finite(value) else math.inf


def _close(value: Any, target: float) -> bool:
    return _finite(value) and math.isclose(value, target, rel_tol=1e-9, abs_tol=1e-12)


# --- Plots ------------------------------------------------------------------------------------------------------------


def _figure_classes() -> tuple[Any, Any] | None:
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
}
_LINE_STYLES = ("-", "--", ":", "-.")


def _model_styles(rows: Sequence[Row]) -> dict[str, str]:
    models = list(dict.fromkeys(row["model"] for row in rows))
    return {model: _LINE_STYLES[i % len(_LINE_STYLES)] for i, model in enumerate(models)}


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
        Line2D([], [], color=STRATEGY_STYLES[s][0], marker=STRATEGY_STYLES[s][1], linestyle="", label=_NAMES[s])
        if s is not None or not draft_line
        else Line2D([], [], color=STRATEGY_STYLES[s][0], linewidth=1, label=_NAMES[s])
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
    for model, linestyle in models.items():
        model_rows = [r for r in rows if r["model"] == model]
        size = _base_size(model_rows, base)
        for strategy in _SERIES_ORDER:
            points = sorted(
                (r["gamma"], r["gen_ppl"])
                for r in model_rows
                if r.get("remask") == strategy and _close(r.get("refine_block_size"), size) and _finite(r["gen_ppl"])
            )
            if points:
                color, marker = STRATEGY_STYLES[strategy]
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker=marker, color=color, linestyle=linestyle, label=f"{model}: {strategy}")
                drawn += ys
                strategies.append(strategy)
        draft = _draft(model_rows)
        if draft is not None and _finite(draft.get("gen_ppl")):
            axes.axhline(draft["gen_ppl"], color=STRATEGY_STYLES[None][0], linestyle=linestyle, linewidth=1)
            drawn.append(draft["gen_ppl"])
            strategies.append(None)
    if not drawn:
        return None
    _log_if_wide(axes, drawn)
    axes.set_xlabel("γ (fraction of generated tokens remasked)")
    axes.set_ylabel(f"gen PPL ({_judge_name(rows)})")
    axes.set_title("γ sweep at the base refine block size (draft: horizontal line)")
    _legend(figure, [s for s in _ABLATION_ORDER if s in strategies], models, draft_line=True)
    return figure


def pareto_figure(classes: tuple[Any, Any], rows: Sequence[Row]) -> Any | None:
    """Gen PPL against NFEs per sample for every variant, coloured by strategy; each model's Pareto front joined.

    The front's points are labelled with their variant; a label that would overlap another label is left out
    (the NFE table of the report lists every variant).

    Returns:
        The matplotlib Figure, or None when no row has both NFEs and a gen PPL.
    """
    figure, axes = _new_axes(classes)
    drawn: list[float] = []
    models = _model_styles(rows)
    strategies: set[str | None] = set()
    fronts: list[Row] = []
    for model, linestyle in models.items():
        scored = [r for r in rows if r["model"] == model and _finite(r.get("gen_ppl")) and _finite(r.get("nfes"))]
        for strategy in _ABLATION_ORDER:
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
    _legend(figure, [s for s in _ABLATION_ORDER if s in strategies], models)
    _label_without_overlap(figure, axes, fronts)
    return figure


def _label_without_overlap(
    figure: Any, axes: Any, points: Sequence[Row], x: str = "nfes", name: Callable[[Row], str] | None = None
) -> None:
    """Label each point (`x`, gen PPL) at the first offset whose box overlaps no label or axes edge; else skip it.

    Labels are `name(row)`, by default the variant; a label shared by several points (a variant on several models'
    fronts) is placed once.
    """
    name = name or (lambda row: row["variant"])
    renderer = figure.canvas.get_renderer()
    figure.draw_without_rendering()  # settle the layout, so the boxes measured below are final
    inside = axes.get_window_extent(renderer)
    placed: list[Any] = []
    for text, row in {name(r): r for r in points}.items():
        for offset in ((5, 5), (5, -12), (-5, 5), (-5, -12), (5, 14), (5, -22)):
            label = axes.annotate(
                text,
                (row[x], row["gen_ppl"]),
                xytext=offset,
                textcoords="offset points",
                fontsize=7,
                ha="left" if offset[0] > 0 else "right",
            )
            box = label.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            label.remove()


def entropy_figure(classes: tuple[Any, Any], rows: Sequence[Row]) -> Any | None:
    """Gen PPL against entropy, one panel per model: the draft frontier as a line, refined variants as points.

    Refined points are coloured by strategy and labelled with their variant. A refined point below its model's line
    is better than drafting alone at the same entropy.

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
    to_label: list[tuple[Any, list[Row]]] = []
    for axes, (model, comparison) in zip(panels, comparisons.items(), strict=True):
        drafts = [(r, p) for r, p in comparison.points if math.isfinite(p.entropy) and math.isfinite(p.gen_ppl)]
        axes.scatter([p.entropy for _, p in drafts], [p.gen_ppl for _, p in drafts], color="#999999", marker="x", s=25)
        line = _frontier_line(comparison.frontier)
        axes.plot([x for x, _ in line], [y for _, y in line], color="#555555", zorder=2)
        base = next((r for r, _ in drafts if not r.get("draft_frontier")), None)
        if base is not None:
            color, marker = STRATEGY_STYLES[None]
            axes.scatter([base["entropy"]], [base["gen_ppl"]], color=color, marker=marker, s=120, zorder=3)
            strategies.add(None)
        drawn += [p.gen_ppl for _, p in drafts]
        labelled = []
        for strategy in _SERIES_ORDER:
            points = [r for r, _ in comparison.variants if r.get("remask") == strategy]
            points = [r for r in points if _finite(r.get("entropy")) and _finite(r.get("gen_ppl"))]
            if points:
                color, marker = STRATEGY_STYLES[strategy]
                xs, ys = [r["entropy"] for r in points], [r["gen_ppl"] for r in points]
                axes.scatter(xs, ys, color=color, marker=marker, s=30, zorder=3)
                strategies.add(strategy)
                drawn += ys
                labelled += points
        axes.set_title(model, fontsize="medium")
        axes.set_xlabel("entropy (nats, mean per sample)")
        to_label.append((axes, labelled))
    _log_if_wide(panels[0], drawn)
    panels[0].set_ylabel(f"gen PPL ({_judge_name(rows)})")
    figure.suptitle("Gen PPL against entropy: below the line is better than drafting alone")
    extra = [
        Line2D([], [], color="#999999", marker="x", linestyle="", label="draft at other top-p / T"),
        Line2D([], [], color="#555555", label="draft frontier"),
    ]
    _legend(figure, [s for s in _ABLATION_ORDER if s in strategies], {}, extra=extra, below=True)
    for axes, labelled in to_label:  # after the legend and shared axis are set, so the layout is final
        _label_without_overlap(figure, axes, labelled, x="entropy")
    return figure


def _frontier_line(frontier: Sequence[FrontierPoint], steps: int = 16) -> list[tuple[float, float]]:
    """Points along the frontier as `match_entropy` interpolates it (geometric between neighbours), for drawing."""
    line = [(frontier[0].entropy, frontier[0].gen_ppl)] if frontier else []
    for a, b in zip(frontier, frontier[1:], strict=False):
        for k in range(1, steps + 1):
            w = k / steps
            line.append((a.entropy + w * (b.entropy - a.entropy), a.gen_ppl ** (1 - w) * b.gen_ppl**w))
    return line


def _save_figure(figure: Any | None, path: Path) -> bool:
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


# --- Writing ----------------------------------------------------------------------------------------------------------


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
    classes = _figure_classes() if plots else None
    if plots and classes is None:
        note = NO_PLOTS
    elif classes is not None:
        paper = [r for r in rows if not r.get("draft_frontier")]
        if _save_figure(
            gamma_figure(classes, [r for r in paper if is_exact(r)], base_refine_block_size), out / GAMMA_PLOT
        ):
            written.append(out / GAMMA_PLOT)
        if _save_figure(pareto_figure(classes, paper), out / PARETO_PLOT):
            written.append(out / PARETO_PLOT)
        if _save_figure(entropy_figure(classes, rows), out / ENTROPY_PLOT):
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
    verdicts = [line for model_rows in by_model.values() if (line := _verdict_line(model_rows))]
    return ReportResult(path, written, note, verdicts)

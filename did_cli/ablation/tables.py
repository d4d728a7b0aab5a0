"""The sweep's report as Markdown: the paper's tables per model, cheaper refinements, the entropy-matched view.

One section per model holds the paper's ablations (research notes §1.2–1.4, §3.2): the remask strategy ablation
(none / random / post-hoc / snapshot at the base γ and B2), the γ sweep, the refine block size (B2) sweep and NFEs
against gen PPL, with entropy beside every gen PPL because repetitive text earns a low perplexity; cheaper
refinements (confidence-threshold commits, reused kept keys/values) get their own table of draft and refine
seconds against the share of the exact refinement's gen PPL gain they keep. With several models a side-by-side
strategy table comes first. The paper's published numbers are quoted under the tables they belong to. Pure: rows in,
text out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from did_cli.ablation.matched import matched_section, verdict_line
from did_cli.ablation.rows import (
    ABLATION_ORDER,
    SERIES_ORDER,
    STRATEGY_NAMES,
    Row,
    base_size,
    best_row,
    close,
    draft_row,
    finite,
    has_mauve,
    is_exact,
    markdown_table,
    mauve_cell,
    num,
    pareto_front,
    ppl_cell,
    size_cell,
    sort_value,
)

__all__ = ["render_report"]

# The paper's strategy ablation (110M model, OWT, L = 1024, GPT-2 Large judge; research notes §1.2).
_PAPER_STRATEGY = {None: 27.36, "random": 30.26, "posthoc": 29.85, "snapshot": 21.85}


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
    verdicts = [line for model_rows in by_model.values() if (line := verdict_line(model_rows))]
    if verdicts:
        parts += ["## Verdict at matched entropy", "\n".join(f"- {line}" for line in verdicts)]
    if len(models) > 1:
        parts += [
            "## Models side by side: remask strategy",
            _side_by_side(paper, base_gamma, base_refine_block_size),
        ]
    for model, model_rows in by_model.items():
        size = base_size(model_rows, base_refine_block_size)
        parts += _model_section(model, paper[model], base_gamma, size)
        parts += matched_section(model_rows)
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
        _series_table(rows, "γ", "gamma", lambda r: close(r.get("refine_block_size"), base_size), str),
        "Paper: U-shaped, best at γ = 0.25–0.5, exploding as γ → 1 (no numbers published).",
        f"### Refine block size B2 (γ = {base_gamma:g})",
        _series_table(
            rows, "B2", "refine_block_size", lambda r: close(r.get("gamma"), base_gamma), lambda v: size_cell(v, length)
        ),
        "Paper: only a global block (B2 = L) helps; small refine blocks hurt against no refinement (no numbers "
        "published).",
        "### NFEs against gen PPL",
        _nfe_table(all_rows),
        "Pareto: ● marks the variants no other variant of this model beats on both NFEs and gen PPL.",
        *_cheaper_section(all_rows),
    ]


def _cheaper_section(rows: list[Row]) -> list[str]:
    """Cheaper refinements against the exact one they approximate: time split, NFEs and kept gen PPL gain.

    A variant's reference is the exact refinement at its strategy, γ and B2; for threshold variants, the
    one-token-per-call confidence order (threshold 1, R = 1) when the sweep has it, since they share that order.
    """
    cheaper = [r for r in rows if not is_exact(r)]
    if not cheaper:
        return []
    draft = draft_row(rows)

    def same_point(a: Row, b: Row) -> bool:
        return (
            a.get("remask") == b.get("remask")
            and close(a.get("gamma"), b.get("gamma"))
            and a.get("refine_block_size") == b.get("refine_block_size")
        )

    def reference(row: Row) -> Row | None:
        exact = [r for r in rows if r.get("remask") is not None and (r.get("refine_cache") or 1) == 1]
        exact = [r for r in exact if same_point(r, row)]
        if row.get("confidence_threshold") is not None:
            one_by_one = next((r for r in exact if close(r.get("confidence_threshold"), 1.0)), None)
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
        for row in sorted(cheaper, key=lambda r: sort_value(r.get("refine_seconds")))
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
        markdown_table(headers, head + body),
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
        if finite(base) and finite(best) and finite(value) and base != best:
            kept = f"{100 * (base - value) / (base - best):.0f} %"
    threshold = row.get("confidence_threshold")
    draft_seconds, refine_seconds = row.get("draft_seconds"), row.get("refine_seconds")
    timed = row.get("remask") is not None and finite(refine_seconds) and finite(draft_seconds) and draft_seconds
    ratio = refine_seconds / draft_seconds if timed else None
    name = "draft (no refinement)" if row.get("remask") is None else row["variant"]
    against = "—" if exact is None or exact is row or row is draft else exact["variant"]
    return [
        name,
        "—" if threshold is None else f"{threshold:g}",
        str(row.get("refine_cache") or 1) if row.get("remask") is not None else "—",
        num(row.get("refine_nfes"), 1),
        num(draft_seconds, 3),
        num(refine_seconds, 3) if row.get("remask") is not None else "—",
        num(ratio, 2),
        ppl_cell(row),
        num(row.get("entropy"), 3),
        kept,
        against,
    ]


def _strategy_table(rows: list[Row], base_gamma: float, base_size: int) -> str:
    body = []
    for strategy in ABLATION_ORDER:
        row = _ablation_row(rows, strategy, base_gamma, base_size)
        if row is not None:
            body.append(
                [
                    STRATEGY_NAMES[strategy],
                    ppl_cell(row),
                    num(row.get("entropy"), 3),
                    num(row.get("nfes"), 1),
                    str(row.get("num_degenerate")),
                    f"{_PAPER_STRATEGY[strategy]:.2f}",
                ]
            )
    return markdown_table(["refinement", "gen PPL", "entropy", "NFEs / sample", "degenerate", "paper gen PPL"], body)


def _side_by_side(by_model: dict[str, list[Row]], base_gamma: float, base_refine_block_size: int | None) -> str:
    headers = ["refinement"] + [f"{model} {what}" for model in by_model for what in ("gen PPL", "entropy")]
    body = []
    for strategy in ABLATION_ORDER:
        cells = [STRATEGY_NAMES[strategy]]
        for rows in by_model.values():
            row = _ablation_row(rows, strategy, base_gamma, base_size(rows, base_refine_block_size))
            cells += [ppl_cell(row), num(row.get("entropy") if row else None, 3)]
        body.append(cells)
    return markdown_table(headers, body)


def _ablation_row(rows: list[Row], strategy: str | None, base_gamma: float, base_size: int) -> Row | None:
    if strategy is None:
        return draft_row(rows)
    return next(
        (
            r
            for r in rows
            if r.get("remask") == strategy
            and close(r.get("gamma"), base_gamma)
            and close(r.get("refine_block_size"), base_size)
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
    strategies = [s for s in SERIES_ORDER if any(r["remask"] == s for r in refined)]
    # A strategy run only at the base point is in the strategy table; here it would be one value among dashes.
    swept = [s for s in strategies if len({r[key] for r in refined if r["remask"] == s}) > 1]
    strategies = swept or strategies
    refined = [r for r in refined if r["remask"] in strategies]
    values = sorted({r[key] for r in refined})
    headers = [axis] + [f"{STRATEGY_NAMES[s]} {what}" for s in strategies for what in ("gen PPL", "entropy")]
    best = {s: best_row([r for r in refined if r["remask"] == s]) for s in strategies}
    body = []
    draft = draft_row(rows)
    if draft is not None:
        body.append(
            ["draft (no refinement)"] + [c for _ in strategies for c in (ppl_cell(draft), num(draft.get("entropy"), 3))]
        )
    for value in values:
        cells = [label(value)]
        for s in strategies:
            row = next((r for r in refined if r["remask"] == s and r[key] == value), None)
            cells += [
                ppl_cell(row, bold=row is not None and row is best[s]),
                num(row.get("entropy") if row else None, 3),
            ]
        body.append(cells)
    return markdown_table(headers, body)


def _nfe_table(rows: list[Row]) -> str:
    ordered = sorted(rows, key=lambda r: (sort_value(r.get("nfes")), sort_value(r.get("gen_ppl"))))
    scored = [r for r in ordered if finite(r.get("gen_ppl")) and finite(r.get("nfes"))]
    front = {id(scored[i]) for i in pareto_front([(r["nfes"], r["gen_ppl"]) for r in scored])}
    mauve = has_mauve(rows)
    body = [
        [
            r["variant"],
            num(r.get("nfes"), 1),
            num(r.get("seconds"), 3),
            ppl_cell(r),
            num(r.get("entropy"), 3),
            *([mauve_cell(r)] if mauve else []),
            "●" if id(r) in front else "",
        ]
        for r in ordered
    ]
    headers = ["variant", "NFEs / sample", "seconds / sample", "gen PPL", "entropy", *(["MAUVE"] if mauve else [])]
    return markdown_table([*headers, "Pareto"], body)

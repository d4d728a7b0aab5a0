"""The sweep's results store: `results.jsonl` rows, what one row holds, and which existing row a run reuses.

One row per scored file (`result_row`), appended and flushed as each file is scored, so an interrupted sweep keeps
every finished score. A row is keyed by (model label, variant id, configuration); readers take the last row per key
(a row re-appended with MAUVE supersedes the one before it), and rows of other configurations stay in the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from did_cli.ablation.plan import ModelPlan, ModelSpec, Variant
from did_cli.errors import OutputError
from did_cli.evaluation.scoring import FileResult
from did_cli.files import strict_json
from did_cli.provenance import versions
from did_cli.records import Record

__all__ = [
    "CONTINUE",
    "RESULTS",
    "append_result",
    "earlier_compatible",
    "index_rows",
    "latest_rows",
    "read_results",
    "result_row",
    "row_key",
]

RESULTS = "results.jsonl"
# How an interrupted or failed sweep continues (it has no --resume: finished files and rows are reused).
CONTINUE = "run the same command again to continue"
Row = dict[str, Any]
RowKey = tuple[Any, Any, str]

# Configuration keys added after rows were first written, with the value every earlier row was made with.
_CONFIG_DEFAULTS = {"kv_cache": True, "passes": 8, "ensemble_ratio": 0.5}


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
    """Append one row as a JSON line and flush it, so an interrupted sweep keeps every finished score.

    Raises:
        OutputError: the row cannot be written (a full disk): nothing of it is left, and the line names the file
            and says how the sweep continues.
    """
    path = Path(path)
    size = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+", encoding="utf-8") as handle:
            # A line cut short by an interrupt has no newline; end it so the new row starts on its own line.
            size = handle.seek(0, os.SEEK_END)
            if size > 0:
                handle.seek(size - 1)
                if handle.read(1) != "\n":
                    handle.write("\n")
            handle.write(strict_json(row) + "\n")  # an undefined number is null, never NaN
            handle.flush()
    except OSError as exc:
        if size is not None:
            with contextlib.suppress(OSError):
                os.truncate(path, size)
        raise OutputError(
            f"cannot append to {path}: {exc.strerror or exc}; finished sample files and earlier rows are kept "
            f"in {path.parent} ({CONTINUE})"
        ) from None


def latest_rows(rows: Sequence[Row]) -> list[Row]:
    """The last row per (model, variant), in first-seen order: a re-run with other settings supersedes older rows."""
    latest: dict[tuple[Any, Any], Row] = {}
    for row in rows:
        # Assigning to an existing key keeps its place, so the order is that of first appearance.
        latest[(row.get("model"), row.get("variant"))] = row
    return list(latest.values())


def result_row(
    spec: ModelSpec,
    variant: Variant,
    config: dict[str, Any],
    result: FileResult,
    records: Sequence[Record],
    judge: dict[str, Any],
) -> dict[str, Any]:
    """One line of `results.jsonl`: the variant, its scores, its cost per sample, and what produced it.

    `nfes` and `seconds` are means per sample over all stages (draft + refinement), as the paper counts the cost
    of a refined sample; `draft_nfes` and `refine_nfes` split the NFEs, `draft_seconds` and `refine_seconds` the
    wall-clock. `top_p` and `temperature` are the draft's; `draft_frontier` marks drafts drawn only for the draft
    frontier; `per_sample` holds the ids, perplexities and entropies behind `gen_ppl` and `entropy`. `config` is the
    sweep's and keys the row (its `unmasking` is the refined drafts', so a frontier draft's own nucleus and temperature
    are in `top_p` and `temperature` only); `mauve`, when a reference was given, is MAUVE against it.
    """
    ppls = [s.ppl for s in result.samples if s.scored_tokens]
    finite = all(math.isfinite(p) for p in ppls)
    sem = statistics.stdev(ppls) / math.sqrt(len(ppls)) if len(ppls) > 1 and finite else None
    summary = result.summary()
    unmasking = config["unmasking"]
    return {
        "model": spec.label,
        "model_path": spec.path,
        "variant": variant.id,
        "draft_frontier": variant.frontier,
        "top_p": variant.top_p if variant.top_p is not None else unmasking["top_p"],
        "temperature": variant.temperature if variant.temperature is not None else unmasking["temperature"],
        "remask": variant.remask,
        "gamma": variant.gamma,
        "refine_block_size": variant.refine_block_size,
        "edit_threshold": variant.edit_threshold,
        "confidence_threshold": variant.confidence_threshold,
        "refine_cache": variant.refine_cache,
        "length": config["length"],
        "draft_block_size": config["draft_block_size"],
        **{key: summary[key] for key in ("gen_ppl", "gen_ppl_pooled", "entropy", "num_degenerate", "num_samples")},
        "gen_ppl_sem": sem,
        "mean_tokens": summary["mean_tokens"],
        "nfes": _mean(sum(s.get("nfes", 0) for s in r.stages) for r in records),
        "draft_nfes": _mean(r.stages[0].get("nfes", 0) for r in records),
        "refine_nfes": _mean(sum(s.get("nfes", 0) for s in r.stages[1:]) for r in records),
        "seconds": _mean(sum(s.get("seconds", 0.0) for s in r.stages) for r in records),
        "draft_seconds": _mean(r.stages[0].get("seconds", 0.0) for r in records),
        "refine_seconds": _mean(sum(s.get("seconds", 0.0) for s in r.stages[1:]) for r in records),
        "file": result.source,
        # What gen PPL and entropy average, per sample (null: no token to score), for standard errors of
        # differences between variants (did_cli.ablation.entropy_matched pairs samples by id).
        "per_sample": {
            "id": [s.id for s in result.samples],
            "ppl": [s.ppl if s.scored_tokens and math.isfinite(s.ppl) else None for s in result.samples],
            "entropy": [s.entropy for s in result.samples],
        },
        "judge": judge,
        "config": config,
        "versions": versions(),
    }


def row_key(label: str, variant: str, config: dict[str, Any]) -> RowKey:
    """A row's key: model label, variant id and configuration (keys added later at the value older rows had)."""
    return label, variant, json.dumps({**_CONFIG_DEFAULTS, **config}, sort_keys=True)


def index_rows(rows: Iterable[Row]) -> dict[RowKey, Row]:
    """The last row per key: rows of other settings stay in the file and are skipped."""
    return {
        row_key(row.get("model"), row.get("variant"), config): row
        for row in rows
        if isinstance(config := row.get("config"), dict)
    }


def earlier_compatible(done: dict[RowKey, Row], plans: Sequence[ModelPlan], rows: Sequence[Row]) -> list[Row]:
    """Rows of earlier runs in the same folder made with the same models and settings but other variants.

    They belong in the report: a strategy ablation and a gamma sweep run as two commands on one folder share their
    drafts and judge, so the report should show both.
    """
    configs = {(label, config) for label, _, config in (row_key(p.spec.label, "", p.config) for p in plans)}
    present = {(row.get("model"), row.get("variant")) for row in rows}
    return [
        row
        for (label, variant, config), row in done.items()
        if (label, config) in configs and (label, variant) not in present
    ]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values) if values else math.nan

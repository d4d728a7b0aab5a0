"""`did sweep`: the paper's ablations for one or more models in one command, as results.jsonl, report.md and plots.

All outputs go to files in `--out`; stdout stays empty. Progress goes to stderr when it is a terminal, notes (a
dropped default B2, skipped plots), a one-line summary and, with a draft frontier (`--top-p`/`--temperature` lists), a
`verdict:` line per model go to stderr unless `--quiet`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import TextColumn

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._options import check_count
from did_cli.cli._progress import PlainLines, bar, say, stderr
from did_cli.cli._sampling import unmasking
from did_cli.errors import UsageError
from did_cli.printable import printable

if TYPE_CHECKING:
    from did_cli.ablation.run import EventFn, SweepEvent

Models = Annotated[
    list[str] | None,
    typer.Option(
        "--model", "-m", help="Model to sweep (name, folder or Hub id), optionally labelled: mix=runs/a/final. Repeat."
    ),
]
Judge = Annotated[
    str, typer.Option("--judge", help="Judge LM: gpt2-large (as published), did-tiny-judge, or a folder.")
]
NumSamples = Annotated[int, typer.Option("--num-samples", "-n", help="Samples per variant (the same drafts for all).")]
Length = Annotated[int | None, typer.Option("--length", help="Sequence length L incl. BOS (default: the model's).")]
DraftBlockSize = Annotated[int, typer.Option("--draft-block-size", help="Draft block size B1; must divide L.")]
Remask = Annotated[
    str,
    typer.Option(
        "--remask",
        help="Revision strategies to compare at the base point, comma-separated: snapshot, posthoc, random, "
        "snapshot-entropy, snapshot-margin, energy, mc-dropout, mc-variance, noise-ensemble, and edit (editing "
        "without remasking, at each --edit-threshold).",
    ),
]
EditThresholds = Annotated[
    str,
    typer.Option(
        "--edit-threshold",
        help="Thresholds of the edit variants (with edit among --remask), comma-separated, e.g. 0.9,0.7,0.5.",
    ),
]
Gammas = Annotated[
    str,
    typer.Option("--gamma", help="γ values of snapshot's γ sweep (every strategy's with --grid), comma-separated."),
]
RefineBlockSizes = Annotated[
    str | None,
    typer.Option(
        "--refine-block-size",
        help="B2 values of snapshot's B2 sweep, e.g. 16,64,1024; >= L is one global block (default 16,64,L).",
    ),
]
Grid = Annotated[
    bool,
    typer.Option(
        "--grid", help="Run every (strategy, γ, B2) combination, not one axis at a time around (snapshot, 0.5, L)."
    ),
]
Thresholds = Annotated[
    str | None,
    typer.Option(
        "--confidence-threshold",
        help="Cheaper refinements: commit every position above each threshold per call (confidence order), e.g. "
        "0.9,0.7; run at the base strategy and γ with a global block, beside the exact refinement.",
    ),
]
RefineCaches = Annotated[
    str | None,
    typer.Option(
        "--refine-cache",
        help="Cheaper refinements: recompute kept positions' keys/values every R calls, e.g. 1,4,16 (1 = exact); "
        "crossed with --confidence-threshold.",
    ),
]
TopPs = Annotated[
    str,
    typer.Option(
        "--top-p",
        help="Nucleus mass of the drafts (BD3-LM's protocol: 0.9), or a list for the draft frontier, e.g. "
        "0.8,0.85,0.9,0.95,1.0: a draft at each value, so every refined variant is read at matched entropy. "
        "Variants refine the drafts at 0.9 when listed, else at the first value.",
    ),
]
Temperatures = Annotated[
    str,
    typer.Option(
        "--temperature",
        help="Softmax temperature of the drafts, or a list for the draft frontier (crossed with --top-p); variants "
        "refine the drafts at 1 when listed, else at the first value.",
    ),
]
Reference = Annotated[
    Path | None,
    typer.Option(
        "--reference",
        help="Reference texts (.jsonl with a text field, records, or .txt one per line): MAUVE of every file "
        "against them, from the judge's features (needs pip install 'did[mauve]'; skipped with a note otherwise).",
    ),
]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Output folder; run again with the same one to resume.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Samples per model call; never changes the samples.")]


def parse_list(text: str, flag: str, kind: type) -> list[Any]:
    """Comma-separated values of one type (`int`, `float` or `str`), at least one."""
    try:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} must be a comma-separated list of {kind.__name__} values, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} needs at least one value")
    return values


@handle_errors(on_interrupt="interrupted: finished variants are kept; run the same command again to continue")
def sweep(
    model: Models = None,
    judge: Judge = o.DEFAULT_JUDGE,
    num_samples: NumSamples = 64,
    length: Length = None,
    draft_block_size: DraftBlockSize = 4,
    remask: Remask = "snapshot,posthoc,random",
    gamma: Gammas = "0.1,0.25,0.5,0.75,1.0",
    refine_block_size: RefineBlockSizes = None,
    grid: Grid = False,
    seed: o.SamplingSeed = 0,
    top_p: TopPs = "0.9",
    temperature: Temperatures = "1.0",
    order: o.Order = None,
    steps_per_block: o.StepsPerBlock = None,
    tokens_per_call: o.TokensPerCall = 1,
    no_kv_cache: o.NoKVCache = False,
    confidence_threshold: Thresholds = None,
    refine_cache: RefineCaches = None,
    edit_threshold: EditThresholds = "0.9",
    passes: o.Passes = 8,
    ensemble_ratio: o.EnsembleRatio = 0.5,
    batch_size: BatchSize = 8,
    reference: Reference = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "float32",
    out: OutDir = Path("sweep"),
    degenerate_entropy: o.DegenerateEntropy = 4.0,
    quiet: o.Quiet = False,
) -> None:
    """Draft once, refine the same drafts for every variant, score all with a judge, and write report.md."""
    from did_cli.ablation.plan import SweepSettings
    from did_cli.evaluation.settings import EvalSettings
    from did_cli.processes import current_processes

    processes = current_processes()  # each launched process samples and scores on its own accelerator
    quiet = quiet or not processes.is_main
    top_ps = parse_list(top_p, "--top-p", float)
    temperatures = parse_list(temperature, "--temperature", float)
    # Checked here too so the message names the flag; the settings repeat the check for Python callers.
    if (bad := next((v for v in top_ps if not 0.0 < v <= 1.0), None)) is not None:
        raise UsageError(f"--top-p values must be in (0, 1], got {bad}")
    if (bad := next((v for v in temperatures if not 0.0 < v < math.inf), None)) is not None:
        raise UsageError(f"--temperature values must be positive and finite, got {bad}")
    settings = SweepSettings(
        models=model or [],
        judge=judge,
        out=out,
        num_samples=num_samples,
        length=length,
        draft_block_size=draft_block_size,
        remask=parse_list(remask, "--remask", str),
        gammas=parse_list(gamma, "--gamma", float),
        refine_block_sizes=parse_list(refine_block_size, "--refine-block-size", int) if refine_block_size else None,
        grid=grid,
        seed=seed,
        kv_cache=not no_kv_cache,
        # The same rule as draft, refine and generate (e.g. --steps-per-block alone implies --order steps).
        unmasking=unmasking(order, steps_per_block, tokens_per_call, _base(top_ps, 0.9), _base(temperatures, 1.0)),
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        evaluation=EvalSettings(degenerate_entropy=degenerate_entropy),
        confidence_thresholds=parse_list(confidence_threshold, "--confidence-threshold", float)
        if confidence_threshold
        else (),
        refine_caches=parse_list(refine_cache, "--refine-cache", int) if refine_cache else (),
        draft_top_ps=top_ps if len(top_ps) > 1 else (),
        draft_temperatures=temperatures if len(temperatures) > 1 else (),
        reference=reference,
        edit_thresholds=parse_list(edit_threshold, "--edit-threshold", float),
        passes=passes,
        ensemble_ratio=ensemble_ratio,
    )
    check_count(num_samples, "--num-samples")
    check_count(batch_size, "--batch-size")
    from did_cli.ablation.run import run_sweep  # torch: after every option was checked

    with _events(quiet) as on_event:
        result = run_sweep(settings, on_event, processes)
    if not quiet:
        # One line each, however narrow the terminal (scripts grep them); paths shown, never read as markup.
        say(
            f"{len(result.rows)} results ({result.scored} scored now, {result.reused} reused; sampled files: "
            f"{result.drafted} draft, {result.refined} refined); report: {result.report}"
        )
        for line in result.verdicts:
            say(f"verdict: {line}")


def _base(values: list[float], usual: float) -> float:
    """The setting the refined variants' drafts use: the usual one when listed, else the first listed."""
    return next((v for v in values if math.isclose(v, usual)), values[0])


@contextlib.contextmanager
def _events(quiet: bool) -> Iterator[EventFn]:
    """A callback for sweep events: notes on stderr unless quiet, a transient bar only on a terminal."""
    progress = (
        bar("variants", TextColumn("{task.fields[detail]}", markup=False)) if not quiet and stderr.is_terminal else None
    )
    task = progress.add_task("sweep", total=None, detail="") if progress is not None else None
    lines = PlainLines() if progress is None and not quiet else None  # logs and batch jobs: plain lines

    def on_event(event: SweepEvent) -> None:
        message = printable(event.message)  # model labels and paths: shown, never obeyed
        if event.kind == "note":
            if not quiet:
                say(f"note: {message}")
        elif lines is not None and event.kind in ("step", "progress"):
            where = f"sweep step {min(event.step + 1, event.steps)}/{event.steps}: {message}"
            if event.kind == "progress":
                where += f" {event.done}{f'/{event.total}' if event.total else ''} {event.unit}"
            lines(where)
        elif progress is not None and event.kind == "step":
            progress.update(task, description=message, completed=event.step, total=event.steps, detail="")
        elif progress is not None and event.kind == "progress":
            total = f"/{event.total}" if event.total else ""
            progress.update(task, detail=f"{message} {event.done}{total} {event.unit}")

    if progress is None:
        yield on_event
        return
    with progress:
        yield on_event

"""`did eval-ppl`: generative perplexity and entropy of sample files under a judge LM, one table row per file."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from did_cli import evaluation
from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.errors import UsageError
from did_cli.files import write_text_atomically

Files = Annotated[
    list[Path],
    typer.Argument(help="Sample records (JSONL), .jsonl with a text field, or .txt (one sample per line); - is stdin."),
]
JudgeName = Annotated[
    str, typer.Option("--judge", help="Judge LM: Hub id (gpt2-large, as published), did-tiny-judge, or a local folder.")
]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Judge windows per forward pass; never changes results.")]
Context = Annotated[int, typer.Option("--context", help="Judge context in tokens (capped at the judge's limit).")]
Stride = Annotated[
    int | None, typer.Option("--stride", help="Sliding-window stride for longer samples (default: half the context).")
]
DegenerateEntropy = Annotated[
    float, typer.Option("--degenerate-entropy", help="Count samples whose unigram entropy (nats) is below this.")
]
MaxTokens = Annotated[
    int | None,
    typer.Option(
        "--max-tokens",
        help="Cut each sample's judge tokens (BOS included) to this many, as BD3-LM's max_length. Default: a did "
        "record's own length, 1024 for plain text; 0 scores everything.",
    ),
]
CleanUpSpaces = Annotated[
    bool,
    typer.Option(
        "--clean-up-spaces",
        help="Clean up tokenization spaces (' .' -> '.') before scoring, as the paper-era transformers decoded.",
    ),
]
JsonOut = Annotated[
    Path | None, typer.Option("--json", help="Write the results, judge, settings and versions here (- for stdout).")
]
PerSample = Annotated[
    Path | None, typer.Option("--per-sample", help="Write one JSON line per sample here: ppl, nll, tokens, entropy.")
]

stderr = Console(stderr=True)


@handle_errors(on_interrupt="interrupted: no result was written")
def eval_ppl(
    files: Files,
    judge: JudgeName = evaluation.DEFAULT_JUDGE,
    revision: o.Revision = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "float32",
    batch_size: BatchSize = 8,
    context: Context = 1024,
    stride: Stride = None,
    degenerate_entropy: DegenerateEntropy = 4.0,
    max_tokens: MaxTokens = None,
    clean_up_spaces: CleanUpSpaces = False,
    json_out: JsonOut = None,
    per_sample: PerSample = None,
    quiet: o.Quiet = False,
) -> None:
    """Generative perplexity (BD3-LM protocol) and entropy of each file's samples under a judge LM."""
    _check_outputs(files, json_out, per_sample)
    settings = evaluation.EvalSettings(context, stride, batch_size, degenerate_entropy, max_tokens, clean_up_spaces)
    with _progress(quiet) as on_progress:
        result = evaluation.eval_ppl(
            files, judge, settings, revision=revision, device=device, dtype=dtype, on_progress=on_progress
        )
    if json_out is not None:
        _write(json_out, json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    if per_sample is not None:
        lines = [{"file": f.source, **s.to_dict()} for f in result.files for s in f.samples]
        _write(per_sample, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    if not quiet:
        stderr.print(_table(result))


def _check_outputs(files: list[Path], json_out: Path | None, per_sample: Path | None) -> None:
    """Refuse outputs that would overwrite an input or each other."""
    outputs = [p for p in (json_out, per_sample) if p is not None and str(p) != "-"]
    if per_sample is not None and str(per_sample) == "-":
        raise UsageError("--per-sample needs a file name; only --json can go to stdout")
    resolved = {p.resolve() for p in files if str(p) != "-"}
    for out in outputs:
        if out.resolve() in resolved:
            raise UsageError(f"{out} is an input; choose another output file")
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise UsageError("--json and --per-sample name the same file")


def _write(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a temporary file renamed into place), or to stdout for "-"."""
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_text_atomically(path, text)


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A transient bar per input over its judge windows, on stderr when it is a terminal; yields the callback."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(source: str, done: int, total: int) -> None:
        if source not in tasks:
            tasks[source] = bar.add_task(source, total=total)
        bar.update(tasks[source], completed=done, total=total)

    with bar:
        yield update


def _table(result: evaluation.EvalResult) -> Table:
    settings = result.settings
    title = f"gen PPL under {result.judge.get('name')} (context {settings['context']}, stride {settings['stride']})"
    caption = (
        "gen PPL: mean of per-sample PPLs, as published; pooled: exp of the token-weighted mean NLL; "
        "entropy in nats; tokens: mean judge tokens per sample"
    )
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD)
    # The file names are what a side-by-side comparison is read by: fold long ones rather than cut them short.
    table.add_column("file", overflow="fold")
    for header in ("samples", "gen PPL", "pooled PPL", "entropy", "degenerate", "tokens"):
        table.add_column(header, justify="right")
    for f in result.files:
        degenerate = f"[red]{f.num_degenerate}[/]" if f.num_degenerate else "0"
        table.add_row(
            f.source,
            str(f.num_samples),
            _number(f.gen_ppl),
            _number(f.gen_ppl_pooled),
            _number(f.entropy, 3),
            degenerate,
            _number(f.mean_tokens, 1),
        )
    return table


def _number(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "—"

"""`did eval-ppl`: generative perplexity and entropy of sample files under a judge LM, one table row per file.

stdout carries only `--json -`; progress and the results table go to stderr. Every JSON output is strict JSON
(an undefined number is null, never NaN or Infinity) and gives each input's sha256. The table names each file by
the shortest path suffix that tells the inputs apart, whole and on one line: when a name does not fit beside the
numbers (off a terminal the width is 80), the rows are numbered and a legend under the table gives each number's
name in full. Names are shown through `printable`. With `--reference`, MAUVE from few texts gets the same note
as in the sweep (`evaluation.mauve.few_texts_note`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from did_cli.cli import _options as o
from did_cli.cli._errors import handle_errors
from did_cli.cli._options import check_count
from did_cli.cli._progress import keyed_bars, say, stderr
from did_cli.errors import InputError, UsageError
from did_cli.files import (
    check_input,
    output_target,
    refuse_overwriting_inputs,
    stdout_stream,
    strict_json,
    write_output,
)
from did_cli.printable import printable
from did_cli.settings import check_device_name, dtype_name

if TYPE_CHECKING:
    from did_cli import evaluation

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
Reference = Annotated[
    Path | None,
    typer.Option(
        "--reference",
        help="Reference texts (same formats as the inputs): add each file's MAUVE against them, with features from "
        "the judge (needs the mauve extra: pip install 'did[mauve]'; skipped with a note without it).",
    ),
]
PerSample = Annotated[
    Path | None, typer.Option("--per-sample", help="Write one JSON line per sample here: ppl, nll, tokens, entropy.")
]


@handle_errors(on_interrupt="interrupted: no result was written")
def eval_ppl(
    files: Files,
    judge: JudgeName = o.DEFAULT_JUDGE,
    revision: o.Revision = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "float32",
    batch_size: BatchSize = 8,
    context: Context = 1024,
    stride: Stride = None,
    degenerate_entropy: o.DegenerateEntropy = 4.0,
    max_tokens: MaxTokens = None,
    clean_up_spaces: CleanUpSpaces = False,
    json_out: JsonOut = None,
    per_sample: PerSample = None,
    reference: Reference = None,
    quiet: o.Quiet = False,
) -> None:
    """Generative perplexity (BD3-LM protocol) and entropy of each file's samples under a judge LM."""
    from did_cli.evaluation.settings import EvalSettings
    from did_cli.processes import current_processes

    # Every option is checked before torch is imported (option errors answer at once) and before the judge loads.
    _check_inputs(files, reference)
    _check_outputs(files, reference, json_out, per_sample)
    check_count(batch_size, "--batch-size")
    check_device_name(device)
    dtype_name(dtype)
    settings = EvalSettings(context, stride, batch_size, degenerate_entropy, max_tokens, clean_up_spaces)
    from did_cli import evaluation

    processes = current_processes()
    with keyed_bars(quiet or not processes.is_main, "judge windows", lambda source: f"scoring {source}") as on_progress:
        result = evaluation.eval_ppl(
            files,
            judge,
            settings,
            revision=revision,
            device=processes.device_for(device),  # each launched process scores on its own accelerator
            dtype=dtype,
            on_progress=on_progress,
            processes=processes,
            reference=reference,
        )
    if not processes.is_main:
        return  # the main process holds the same gathered result and writes it once
    if result.mauve is not None and result.mauve.skipped:
        say(f"note: {result.mauve.skipped}")
    few = _few_texts(result)
    if few is not None and not quiet:
        say(f"note: {few}")
    if json_out is not None:
        write_output(json_out, strict_json(result.to_dict(), indent=2) + "\n")
    if per_sample is not None:
        lines = [{"file": f.source, **s.to_dict()} for f in result.files for s in f.samples]
        write_output(per_sample, "".join(strict_json(line) + "\n" for line in lines))
    if not quiet:
        table, legend = _table(result, stderr.width)
        stderr.print(table)
        for line in legend:
            say(line)


def _few_texts(result: evaluation.EvalResult) -> str | None:
    """The sweep's note on MAUVE from few texts, for the smallest input (None without MAUVE or with enough texts)."""
    from did_cli.evaluation.mauve import few_texts_note

    scored = list(result.mauve.results.values()) if result.mauve is not None else []
    if not scored:
        return None
    return few_texts_note(min(r.num_p for r in scored), min(r.num_q for r in scored))


def _check_inputs(files: list[Path], reference: Path | None) -> None:
    """Refuse a folder or a missing file given as an input in one line, before anything is read or loaded."""
    for path in files:
        check_input(path, "a samples file (.jsonl or .txt)")
    try:
        if reference is not None:
            check_input(reference, "a file of reference texts")
    except InputError as exc:
        raise InputError(f"--reference: {exc}") from None


def _check_outputs(files: list[Path], reference: Path | None, json_out: Path | None, per_sample: Path | None) -> None:
    """Refuse outputs that cannot be written, would overwrite an input or each other, or a closed stdout for -."""
    if per_sample is not None and str(per_sample) == "-":
        raise UsageError("--per-sample needs a file name; only --json can go to stdout")
    outputs = [("--json", json_out), ("--per-sample", per_sample)]
    for flag, out in outputs:
        if out is not None and str(out) != "-":
            output_target(out, flag)  # unwritable outputs fail before the judge loads
        elif out is not None:
            stdout_stream(f"pass {flag} FILE")
    refuse_overwriting_inputs(outputs, [*(("sample file", path) for path in files), ("--reference", reference)])


def short_names(sources: list[str]) -> list[str]:
    """Each path shortened to its fewest last components that no other path ends with."""
    parts = [Path(source).parts or (source,) for source in sources]

    def suffix(path: tuple[str, ...], depth: int) -> str:
        return "/".join(path[-depth:])

    names = []
    for i, path in enumerate(parts):
        others = [other for j, other in enumerate(parts) if j != i]
        depth = 1
        while depth < len(path) and any(suffix(other, depth) == suffix(path, depth) for other in others):
            depth += 1
        names.append(suffix(path, depth))
    return names


def _table(result: evaluation.EvalResult, width: int) -> tuple[Table, list[str]]:
    """The results table for a console `width` columns wide, and the legend lines that name numbered rows (or none).

    Each file's name is whole and on one line: in the table when every name fits beside the numbers, else the rows
    are numbered and the legend gives each number's name.
    """
    settings = result.settings
    title = Text(
        f"gen PPL under {printable(str(result.judge.get('name')))} (context {settings['context']}, "
        f"stride {settings['stride']})"
    )
    threshold = settings["degenerate_entropy"]
    from did_cli import evaluation

    at_127 = evaluation.degenerate_threshold(threshold, 128)
    caption = Text(
        "gen PPL: mean of per-sample PPLs, as published; pooled: exp of the token-weighted mean NLL; entropy in "
        f"nats; degenerate: samples with entropy below {threshold:g} nats at 256+ tokens, × log n / log 256 for "
        f"n tokens (BOS + 127 tokens: {at_127:.2f}); tokens: mean judge tokens per sample"
    )
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD)
    headers: tuple[str, ...] = ("samples", "gen PPL", "pooled", "entropy", "degenerate", "tokens")
    rows = [
        [
            str(f.num_samples),
            _number(f.gen_ppl),
            _number(f.gen_ppl_pooled),
            _number(f.entropy, 3),
            str(f.num_degenerate),
            _number(f.mean_tokens, 1),
        ]
        for f in result.files
    ]
    if result.mauve is not None:
        cuts = sorted({r.max_tokens for r in result.mauve.results.values()})
        # Each input is cut at its own length (the reference alike), so several lengths can appear.
        detail = f"judge features, {'/'.join(map(str, cuts))} tokens" if cuts else "skipped"
        caption.append(f"; MAUVE: against {printable(str(result.mauve.reference))} ({detail})")
        headers = (*headers, "MAUVE")
        table.pad_edge = False  # the seventh number column fits 80 columns without the outer padding
        for f, row in zip(result.files, rows, strict=True):
            value = result.mauve.value(f.source)
            row.append(_number(value, 3) if value is not None else "—")
    # A comparison is read by file name: never break one over lines; shorten it to what the numbers leave free.
    numbers = sum(max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers))
    # Each column takes its padding (one space each side) and one divider besides its text.
    room = max(8, width - numbers - 3 * (len(headers) + 1) - 1 + (0 if table.pad_edge else 2))
    names = short_names([printable(f.source) for f in result.files])  # shown, never obeyed
    numbered = any(len(name) > room for name in names)
    table.add_column("file (#)" if numbered else "file", no_wrap=True)
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for number, (f, name, cells) in enumerate(zip(result.files, names, rows, strict=True), start=1):
        # Texts, so a "[" in a file name is never read as rich markup.
        cells[4] = Text(cells[4], style="red" if f.num_degenerate else "")
        table.add_row(Text(f"#{number}" if numbered else name), *cells)
    legend = [f"file #{number}: {name}" for number, name in enumerate(names, start=1)] if numbered else []
    return table, legend


def _number(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "—"

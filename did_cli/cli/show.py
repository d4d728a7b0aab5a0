"""`did show`: view one sample record as a confidence heat-map in the terminal, or as a standalone HTML page.

The rendering goes to stdout: for a viewer the picture is the data asked for, so it can be paged (`| less -R`)
or saved; when stdout is not a colour terminal the rendering uses brackets and arrows instead of colours. With
`--html` the page is written atomically to the given file (or to stdout for `-`) and one line on stderr says where.
`--text` prints the records' own text instead (each record's `text`, as `jq -r .text` would), needing no tokenizer:
verbatim into a pipe or file, and on a terminal with control characters shown (`printable`) line by line.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from did_cli.cli._errors import handle_errors
from did_cli.cli._progress import say
from did_cli.errors import InputError, ModelLoadError, UsageError
from did_cli.files import output_target, refuse_overwriting_inputs, stdout_stream, write_output
from did_cli.printable import printable
from did_cli.records import Record, read_records

File = Annotated[str, typer.Argument(help="Sample records (JSONL from draft, refine or generate), or - for stdin.")]
Index = Annotated[
    int | None,
    typer.Option(
        "--index",
        "-i",
        help="Which record: its 0-based position in the file; -1 is the last. Default: the first (with --text, all).",
    ),
]
AsText = Annotated[
    bool,
    typer.Option(
        "--text",
        help="Print each record's text (the generated part, as jq -r .text) instead of the heat-map; no tokenizer.",
    ),
]
Html = Annotated[
    Path | None, typer.Option("--html", help="Write a standalone HTML page here (- for stdout) instead of printing.")
]
Model = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Render with this model's tokenizer (default: the one the record names)."),
]
Tokenizer = Annotated[
    str | None, typer.Option("--tokenizer", help="Render with this tokenizer id or folder (overrides --model).")
]


def select_record(source: str, index: int) -> Record:
    """The record at 0-based position `index` of a JSONL file or stdin ("-"); negative counts from the end.

    A non-negative index stops reading at that record, so a long stream is not read to its end.
    """
    name = "stdin" if source == "-" else source
    if index >= 0:
        count = 0
        for count, record in enumerate(read_records(source), start=1):  # noqa: B007 - count is used after the loop
            if count - 1 == index:
                return record
        raise UsageError(f"{name} holds {count} records; --index {index} is out of range")
    last: deque[Record] = deque(maxlen=-index)
    count = 0
    for count, record in enumerate(read_records(source), start=1):  # noqa: B007 - count is used after the loop
        last.append(record)
    if count < -index:
        raise UsageError(f"{name} holds {count} records; --index {index} is out of range")
    return last[0]


def _model_tokenizer(name: str) -> Any:
    # A model's tokenizer without loading its weights; resolving first makes Hub ids work like folders.
    from did_cli.checkpoints import load_tokenizer, resolve

    return load_tokenizer(str(resolve(name)))


def record_tokenizer(record: Record, model: str | None = None, tokenizer: str | None = None) -> Any:
    """The tokenizer to render `record` with: `tokenizer`, else `model`'s, else the one the record names.

    Without overrides the record's tokenizer name is tried, then its model's (a moved checkpoint folder or an
    uncached Hub id fails one but may pass the other).

    Raises:
        ModelLoadError: no candidate could be loaded; the message says to pass --tokenizer or --model.
    """
    from did_cli.checkpoints import load_tokenizer
    from did_cli.provenance import record_model

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if model is not None:
        return _model_tokenizer(model)
    candidates = [
        (load_tokenizer, (record.tokenizer or {}).get("name")),
        (_model_tokenizer, record_model(record)),
        (_model_tokenizer, (record.model or {}).get("name")),
    ]
    tried = []
    for loader, name in candidates:
        if not name or name == "<in-memory>" or name in tried:
            continue
        tried.append(name)
        try:
            return loader(name)
        except (ModelLoadError, OSError, ValueError):
            continue
    names = ", ".join(tried) or "none named in the record"
    raise ModelLoadError(
        f"could not load a tokenizer for record {record.id} (tried {names}); pass --tokenizer or --model"
    )


def check_ids(record: Record, tokenizer: Any) -> None:
    """Refuse a record whose ids the tokenizer cannot decode, or whose draft is not as long as its tokens."""
    if record.draft_tokens is not None and len(record.draft_tokens) != len(record.tokens):
        raise InputError(f"record {record.id}: draft_tokens must be as long as tokens ({len(record.tokens)})")
    size = len(tokenizer)
    if any(t >= size for t in [*record.tokens, *(record.draft_tokens or [])]):
        raise InputError(
            f"record {record.id} holds token ids beyond the tokenizer's {size}; pass the right --tokenizer"
        )
    recorded = (record.tokenizer or {}).get("vocab_size")
    if recorded is not None and recorded != size:
        say(f"warning: record {record.id} was made with a {recorded}-token tokenizer; this one has {size}")


def print_texts(records: Iterable[Record], terminal: bool) -> None:
    """Each record's text and a newline on stdout, flushed record by record (a pipe streams).

    Into a pipe or file the text is written as it is, as `jq -r .text` writes it; on a `terminal` each line of it goes
    through `printable`, so an escape sequence in a sample is shown, never obeyed, while its line breaks stay.
    """
    for record in records:
        text = "\n".join(printable(line) for line in record.text.split("\n")) if terminal else record.text
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


@handle_errors
def show(
    file: File,
    index: Index = None,
    html: Html = None,
    model: Model = None,
    tokenizer: Tokenizer = None,
    text: AsText = False,
) -> None:
    """Show one sample: tokens coloured by confidence, remasked positions and what refinement changed (or --text)."""
    if text:
        given = [flag for flag, value in (("--html", html), ("--model", model), ("--tokenizer", tokenizer)) if value]
        if given:
            raise UsageError(f"--text prints the records' own text; it takes no {', '.join(given)}")
        stream = stdout_stream("nowhere to print the text")
        records = read_records(file) if index is None else [select_record(file, index)]
        print_texts(records, terminal=stream.isatty())
        return
    index = 0 if index is None else index
    if html is not None and str(html) != "-":
        output_target(html, "--html")  # an unwritable page fails before the record is read
        refuse_overwriting_inputs([("--html", html)], [("records file", file)])
    else:
        stdout_stream("pass --html FILE to write the page to a file")  # a closed stdout fails before any work
    record = select_record(file, index)
    tok = record_tokenizer(record, model, tokenizer)
    check_ids(record, tok)
    from did_cli import display

    texts = display.token_texts(tok, [*record.tokens, *(record.draft_tokens or [])])
    if html is None:
        console = Console()
        styled = console.color_system is not None and not console.no_color
        console.print(display.render_sample(record, texts, styled=styled), soft_wrap=not console.is_terminal)
    else:
        write_output(html, display.render_html(record, texts))
        if str(html) != "-":
            say(f"wrote {html}")

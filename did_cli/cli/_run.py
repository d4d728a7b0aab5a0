"""Plumbing shared by the sampling commands: loading, progress on stderr, the output file, streaming records out.

stdout carries records only. Progress goes to stderr: a rich bar when stderr is a terminal (told never to take over
stdout, which rich's live displays otherwise do), plain rate-limited lines when it is not (logs, batch jobs), and a
closing summary in both cases unless `--quiet`. Heavy modules (torch, the model code) are imported inside the
functions so `did --help` and option errors answer at once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from did_cli.config import UnmaskingSettings
from did_cli.errors import UsageError
from did_cli.records import Record, RecordWriter

if TYPE_CHECKING:
    from did_cli.api import Progress as ProgressEvent
    from did_cli.model import BD3LM

stderr = Console(stderr=True, highlight=False)

# Seconds between plain progress lines when stderr is not a terminal; DID_PROGRESS_SECONDS overrides it.
_PLAIN_INTERVAL = 10.0


def say(message: str) -> None:
    """One plain line on stderr (markup in `message` is printed literally)."""
    stderr.print(escape(message), soft_wrap=True)


def load(model: str, tokenizer: str | None, revision: str | None, device: str, dtype: str) -> tuple[BD3LM, Any]:
    """The model and its tokenizer, checked against each other."""
    from did_cli.checkpoints import load_model, load_tokenizer

    loaded = load_model(model, device=device, dtype=dtype, revision=revision)
    return loaded, load_tokenizer(loaded, tokenizer)


def unmasking(
    order: str | None, steps_per_block: int | None, tokens_per_call: int, top_p: float, temperature: float
) -> UnmaskingSettings:
    """UnmaskingSettings from CLI flags; `--steps-per-block` alone implies `--order steps`.

    A flag that the chosen order would ignore is refused rather than silently dropped or silently changing the order.
    """
    if order is None:
        order = "steps" if steps_per_block is not None else "first-hitting"
    if steps_per_block is not None and order != "steps":
        raise UsageError(f"--steps-per-block only applies to --order steps, not --order {order}")
    if order == "steps" and tokens_per_call != 1:
        raise UsageError("--tokens-per-call does not apply to --order steps (--steps-per-block sets the calls)")
    return UnmaskingSettings(order, steps_per_block, tokens_per_call, top_p, temperature)


def _plain_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("DID_PROGRESS_SECONDS", _PLAIN_INTERVAL)))
    except ValueError:
        return _PLAIN_INTERVAL


class Reporter:
    """Progress and the closing summary on stderr (see the module docstring); silent with `quiet`."""

    def __init__(self, quiet: bool, total: int | None) -> None:
        self.quiet = quiet
        self.live = not quiet and stderr.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._total = total
        self._interval = _plain_interval()
        self._last_line = time.perf_counter()
        self.started = time.perf_counter()

    def __enter__(self) -> Reporter:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("samples"),
                TextColumn("{task.fields[tokens]}"),
                TimeElapsedColumn(),
                console=stderr,
                transient=True,
                # rich's default swaps sys.stdout for a proxy that prints above the bar, on stderr: records would
                # land on the screen instead of in the pipe or file stdout points at.
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("sampling", total=self._total, tokens="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        total = event.samples_total or self._total
        if self._progress is not None:
            tokens = f"batch tokens {event.tokens_done}/{event.tokens_total}" if event.tokens_total else ""
            self._progress.update(
                self._task, completed=event.samples_done, description=event.stage, tokens=tokens, total=total
            )
            return
        now = time.perf_counter()
        if now - self._last_line < self._interval:
            return
        self._last_line = now
        of_total = f"/{total}" if total else ""
        say(f"{event.stage}: {event.samples_done}{of_total} samples finished, {now - self.started:.0f}s elapsed")

    def summary(self, records: int, generated: int, nfes: int, extra: str = "") -> None:
        """One line on stderr: samples, generated tokens, tokens/s (generated only), NFEs."""
        if self.quiet:
            return
        seconds = time.perf_counter() - self.started
        say(
            f"{records} samples, {generated} generated tokens in {seconds:.1f}s "
            f"({generated / max(seconds, 1e-9):.1f} tokens/s), {nfes} NFEs{extra}"
        )


@contextmanager
def output(out: Path | None, *, resume: bool = False) -> Iterator[RecordWriter]:
    """Open `--out` (or stdout) before any work; on failure or Ctrl-C say on stderr what was kept, then re-raise."""
    writer = RecordWriter(out, resume=resume).open()
    try:
        yield writer
    except BaseException:
        note = writer.abort()
        if note:
            say(f"kept: {note}")
        raise
    writer.commit()


def write_records(records: Iterable[Record], writer: RecordWriter, reporter: Reporter, *, new_stages: int) -> int:
    """Stream records to the writer, one flushed line each; returns how many were written.

    `new_stages` is how many stages this command ran (their generated tokens and NFEs go into the summary).
    """
    generated = nfes = 0
    for record in records:
        writer.write(record)
        for stage in record.stages[-new_stages:]:
            is_refine = stage.get("kind") == "refine"
            generated += len(stage.get("remasked", [])) if is_refine else len(record.generated)
            nfes += int(stage.get("nfes", 0))
    kept = f" ({len(writer.kept)} kept from the interrupted run)" if writer.kept else ""
    reporter.summary(writer.count, generated, nfes, kept)
    return writer.count


def stdout_is_terminal() -> bool:
    """Whether stdout is a terminal (records would scroll past instead of reaching a file or pipe)."""
    return sys.stdout is not None and sys.stdout.isatty()

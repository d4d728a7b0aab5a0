"""Plumbing shared by the sampling commands: loading, progress on stderr, streaming records out."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from did_cli.api import Progress as ProgressEvent
from did_cli.attention import check_attn_backend
from did_cli.checkpoints import load_model, load_tokenizer
from did_cli.compile import optimize
from did_cli.config import UnmaskingSettings
from did_cli.model import BD3LM
from did_cli.records import Record, RecordWriter

stderr = Console(stderr=True)


def load(
    model: str,
    tokenizer: str | None,
    revision: str | None,
    device: str,
    dtype: str,
    *,
    attn_backend: str = "auto",
    compile: bool = False,
    cuda_graphs: bool = False,
) -> tuple[BD3LM, Any]:
    """The model and its tokenizer, checked against each other, set to execute as the speed flags ask."""
    check_attn_backend(attn_backend)
    loaded = load_model(model, device=device, dtype=dtype, revision=revision)
    optimize(loaded, attn_backend=attn_backend, compile=compile, cuda_graphs=cuda_graphs)
    return loaded, load_tokenizer(loaded, tokenizer)


def unmasking(order: str, steps_per_block: int | None, tokens_per_call: int, top_p: float, temperature: float):
    """UnmaskingSettings from CLI flags; --steps-per-block alone implies the steps order."""
    if steps_per_block is not None and order == "first-hitting":
        order = "steps"
    return UnmaskingSettings(order, steps_per_block, tokens_per_call, top_p, temperature)


class Reporter:
    """A rich progress bar on stderr, shown only when stderr is a terminal and --quiet is off."""

    def __init__(self, quiet: bool, total: int | None) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: Any = None
        self._total = total
        self.started = time.perf_counter()

    def __enter__(self) -> Reporter:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("samples"),
                TextColumn("{task.fields[tokens]}"),
                TimeElapsedColumn(),
                console=stderr,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("sampling", total=self._total, tokens="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        if self._progress is None:
            return
        tokens = f"batch tokens {event.tokens_done}/{event.tokens_total}" if event.tokens_total else ""
        self._progress.update(
            self._task,
            completed=event.samples_done,
            description=event.stage,
            tokens=tokens,
            total=event.samples_total or self._total,
        )

    def summary(self, records: int, generated: int, nfes: int) -> None:
        """One line on stderr: samples, generated tokens, tokens/s (generated only), NFEs."""
        if self.quiet or not sys.stderr.isatty():
            return
        seconds = time.perf_counter() - self.started
        stderr.print(
            f"[bold]{records}[/] samples, {generated} generated tokens in {seconds:.1f}s "
            f"({generated / max(seconds, 1e-9):.1f} tokens/s), {nfes} NFEs"
        )


def write_records(records: Iterable[Record], out: Path | None, reporter: Reporter, *, new_stages: int) -> int:
    """Stream records to stdout or `out`, one flushed line each; returns how many were written.

    `new_stages` is how many stages this command ran (their generated tokens and NFEs go into the summary).
    """
    generated = nfes = 0
    with RecordWriter(out) as writer:
        for record in records:
            writer.write(record)
            for stage in record.stages[-new_stages:]:
                is_refine = stage.get("kind") == "refine"
                generated += len(stage.get("remasked", [])) if is_refine else len(record.generated)
                nfes += int(stage.get("nfes", 0))
        count = writer.count
    reporter.summary(count, generated, nfes)
    return count

"""Progress on stderr for every command, and the one guard that keeps stdout for data.

stdout carries records or JSON only. rich's live displays swap `sys.stdout` for a proxy that prints above the bar by
default, so records would land on the screen instead of in the pipe or file stdout points at: `bar` is the one place
that builds a rich bar, always with that redirection off. When stderr is not a terminal (logs, batch jobs) commands
print `PlainLines` instead: one plain line every so often.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

from did_cli.printable import printable

__all__ = ["PlainLines", "bar", "keyed_bars", "say", "stderr"]

stderr = Console(stderr=True, highlight=False)

# Seconds between plain progress lines when stderr is not a terminal; DID_PROGRESS_SECONDS overrides it.
PLAIN_INTERVAL = 10.0


def say(message: str) -> None:
    """One plain line on stderr: markup in `message` is printed literally, control characters shown (`printable`)."""
    stderr.print(escape(printable(message)), soft_wrap=True)


def _plain_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("DID_PROGRESS_SECONDS", PLAIN_INTERVAL)))
    except ValueError:
        return PLAIN_INTERVAL


class PlainLines:
    """Progress for logs and batch jobs (stderr not a terminal): one plain line on stderr every so often.

    The interval is 10 s (`DID_PROGRESS_SECONDS` overrides it), the first line comes after one interval (a command that
    fails at once prints only its error), and `force` prints regardless.
    """

    def __init__(self) -> None:
        self._interval = _plain_interval()
        self.started = self._last = time.perf_counter()

    def __call__(self, message: str, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        say(f"{message}, {now - self.started:.0f}s elapsed")


def bar(unit: str, *extra: ProgressColumn) -> Progress:
    """A transient rich progress bar on stderr, counting `unit`s, that never takes over stdout.

    Its description and extra text columns are never read as rich markup: they hold file and model names, which
    callers pass through `printable`.
    """
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        *extra,
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        redirect_stdout=False,  # stdout carries data, whatever stderr is (see the module docstring)
        redirect_stderr=False,
    )


@contextmanager
def keyed_bars(quiet: bool, unit: str, describe: Callable[..., str]) -> Iterator[Callable[..., None] | None]:
    """A callback `(*key, done, total)` drawing one bar per key (a file, a model and block size), or plain lines.

    `describe(*key)` names a key (a file or model name: shown through `printable`). Yields None when `quiet`.
    """
    if quiet:
        yield None
        return
    if not stderr.is_terminal:
        lines = PlainLines()

        def line(*args: Any) -> None:
            *key, done, total = args
            lines(f"{describe(*key)}: {done}/{total} {unit}")

        yield line
        return
    progress = bar(unit)
    tasks: dict[tuple[Any, ...], Any] = {}

    def update(*args: Any) -> None:
        *key, done, total = args
        if tuple(key) not in tasks:
            tasks[tuple(key)] = progress.add_task(printable(describe(*key)), total=total)
        progress.update(tasks[tuple(key)], completed=done, total=total)

    with progress:
        yield update

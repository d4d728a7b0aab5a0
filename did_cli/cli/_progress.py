"""Progress on stderr for every command, and the one guard that keeps stdout for data.

stdout carries records or JSON only. rich's live displays swap `sys.stdout` for a proxy that prints above the bar by
default, so records would land on the screen instead of in the pipe or file stdout points at: `bar` is the one place
that builds a rich bar, always with that redirection off, and `status` the one that builds the line a command shows
while it starts (imports, model load) before its bar. Every bar shows the time elapsed and an estimate of the time
left. When stderr is not a terminal (logs, batch jobs) commands print `PlainLines` instead: one plain line every so
often, and no start-up line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from did_cli.printable import printable

__all__ = ["PlainLines", "bar", "keyed_bars", "say", "set_status", "status", "stderr"]

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


class _Count(ProgressColumn):
    """Units finished of the total: the task's `finished` field when it has one, else its completed count.

    A bar that fills within a unit (a sample's stages) reports fractions as `completed` and whole units as `finished`.
    """

    def render(self, task: Task) -> Text:
        done = task.fields.get("finished", int(task.completed))
        total = "?" if task.total is None else str(int(task.total))
        return Text(f"{done:>{len(total)}}/{total}", style="progress.download")


def bar(unit: str, *extra: ProgressColumn) -> Progress:
    """A transient rich progress bar on stderr, counting `unit`s, that never takes over stdout.

    After the count (`_Count`) and `extra` come the time elapsed and the time left ("ETA", rich's estimate from the
    recent rate; a caller that reports fractions of a unit gets an estimate before the first unit ends). Building a
    bar ends the start-up `status` line, since a terminal shows one live display at a time. Its description and extra
    text columns are never read as rich markup: they hold file and model names, which callers pass through
    `printable`.
    """
    end_status()
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        _Count(),
        TextColumn(unit),
        *extra,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        redirect_stdout=False,  # stdout carries data, whatever stderr is (see the module docstring)
        redirect_stderr=False,
    )


_status: list[Progress] = []  # the start-up line while it shows (at most one)


@contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    """A transient line on stderr while a command starts up: a spinner, `message` and the seconds elapsed.

    Shown only when `enabled` and stderr is a terminal (plain lines elsewhere stay as they are). `set_status` changes
    its message; it ends with the block, or earlier when the command's first `bar` is built.
    """
    if not enabled or not stderr.is_terminal or _status:
        yield
        return
    line = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    line.add_task(printable(message), total=None)
    line.start()
    _status.append(line)
    try:
        yield
    finally:
        end_status()


def set_status(message: str) -> None:
    """Say what the command does now on its start-up line (nothing when none shows); shown through `printable`."""
    for line in _status:
        line.update(line.task_ids[0], description=printable(message))


def end_status() -> None:
    """End the start-up line, if one shows."""
    while _status:
        _status.pop().stop()


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

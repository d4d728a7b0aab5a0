"""One error handler for every command: a user error is one line on stderr and a non-zero exit, never a traceback.

`DID_DEBUG=1` re-raises so the traceback shows. A closed stdout (`did draft | head -1`) ends the command quietly
with status 0, and Ctrl-C exits 130 after saying that finished samples were kept. Every line goes through
`did_cli.printable`, so a file name or a record field holding an escape sequence is shown, never obeyed.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from did_cli.errors import DidError
from did_cli.printable import printable

F = TypeVar("F", bound=Callable[..., Any])


def say_line(message: str) -> None:
    """`message` as one line on stderr, control characters shown (`printable`); a closed stderr is ignored."""
    try:
        sys.stderr.write(printable(message.rstrip("\n")) + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError, AttributeError, ValueError):  # stderr closed (`2>&-`) or gone
        pass


def interrupted(message: str = "interrupted") -> None:
    """Say that Ctrl-C stopped the command (what was kept has been said by then)."""
    say_line(message)


def silence_stdout() -> None:
    # Point stdout at /dev/null so Python's shutdown flush does not complain about the closed pipe.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def out_of_memory(exc: BaseException) -> str | None:
    """What a failed allocation tried ("tried to allocate 93.1 TiB"), or None when `exc` is not one.

    torch raises `OutOfMemoryError` on an accelerator and a plain RuntimeError when the CPU allocator refuses (a
    25 TB request, say); Python's own is MemoryError. Matched by name and message: this module imports no torch.
    """
    text = str(exc)
    is_oom = isinstance(exc, MemoryError) or any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__)
    if not is_oom and not (isinstance(exc, RuntimeError) and re.search(r"can't allocate memory|out of memory", text)):
        return None
    size = re.search(r"tried to allocate ([\d.]+) ?(bytes|[KMGTP]iB)", text, re.IGNORECASE)
    if size is None:
        return "an allocation failed"
    amount, unit = size.groups()
    if unit.lower() == "bytes":
        value, units = float(amount), ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"]
        while value >= 1024 and len(units) > 1:
            value, units = value / 1024, units[1:]
        return f"tried to allocate {value:.1f} {units[0]}"
    return f"tried to allocate {amount} {unit}"


def handle_errors(
    command: F | None = None, *, on_interrupt: str = "interrupted", on_memory: str = "lower --batch-size"
) -> Any:
    """Wrap a Typer command so DidError, a closed pipe and Ctrl-C end it the way users expect.

    Use bare (`@handle_errors`) or with the line to print on Ctrl-C (`@handle_errors(on_interrupt=...)`), which
    should say what the interruption kept, and what to lower when memory runs out (`on_memory`).
    """
    if command is None:
        return functools.partial(handle_errors, on_interrupt=on_interrupt, on_memory=on_memory)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = os.environ.get("DID_DEBUG", "") not in ("", "0")
        try:
            return command(*args, **kwargs)
        except DidError as exc:
            if debug:
                raise
            say_line(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            say_line(on_interrupt)
            raise typer.Exit(130) from None
        except OSError as exc:
            # The machine said no (disk full, no permission, a vanished file): the user's to fix, so one line.
            if debug:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            say_line(f"error: {exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:
            if debug:
                raise
            if type(exc).__name__ == "SafetensorError":  # safetensors' I/O error (a full disk while saving, say)
                say_line(f"error: {exc}")
                raise typer.Exit(1) from None
            if (tried := out_of_memory(exc)) is not None:
                say_line(f"error: out of memory ({tried}); {on_memory}")
                raise typer.Exit(1) from None
            say_line(f"internal error: {type(exc).__name__}: {exc} (set DID_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]

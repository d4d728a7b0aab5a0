"""One error handler for every command: a user error is one line on stderr and a non-zero exit, never a traceback.

`DID_DEBUG=1` re-raises so the traceback shows. A closed stdout (`did draft | head -1`) ends the command quietly
with status 0, and Ctrl-C exits 130 after saying that finished samples were kept.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from did_cli.errors import DidError

F = TypeVar("F", bound=Callable[..., Any])


def _say(message: str) -> None:
    try:
        sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        pass


def interrupted(message: str = "interrupted") -> None:
    """Say that Ctrl-C stopped the command (what was kept has been said by then)."""
    _say(message)


def silence_stdout() -> None:
    # Point stdout at /dev/null so Python's shutdown flush does not complain about the closed pipe.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def handle_errors(command: F | None = None, *, on_interrupt: str = "interrupted") -> Any:
    """Wrap a Typer command so DidError, a closed pipe and Ctrl-C end it the way users expect.

    Use bare (`@handle_errors`) or with the line to print on Ctrl-C (`@handle_errors(on_interrupt=...)`), which
    should say what the interruption kept.
    """
    if command is None:
        return functools.partial(handle_errors, on_interrupt=on_interrupt)

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = os.environ.get("DID_DEBUG", "") not in ("", "0")
        try:
            return command(*args, **kwargs)
        except DidError as exc:
            if debug:
                raise
            _say(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            _say(on_interrupt)
            raise typer.Exit(130) from None
        except OSError as exc:
            # The machine said no (disk full, no permission, a vanished file): the user's to fix, so one line.
            if debug:
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            _say(f"error: {exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:
            if debug:
                raise
            if type(exc).__name__ == "SafetensorError":  # safetensors' I/O error (a full disk while saving, say)
                _say(f"error: {exc}")
                raise typer.Exit(1) from None
            _say(f"internal error: {type(exc).__name__}: {exc} (set DID_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]

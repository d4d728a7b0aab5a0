"""Atomic writes of files and folders, and strict JSON text for every JSON output.

A file or a folder is built under a temporary name beside its target, then renamed into place.

A reader (or a crash) therefore never sees half a checkpoint, half a tokenised corpus or half a report. Temporary
names get the permissions an ordinary `open`/`mkdir` would (tempfile makes them private), so outputs stay readable
by other users of a shared machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from did_cli.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target` (any old content is removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        mask = _umask()
        os.chmod(staging, 0o777 & ~mask)
        for path in staging.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def output_target(path: str | Path, flag: str) -> Path:
    """Where an output named on the command line goes, checked before any work starts.

    A symbolic link is followed, so its target is replaced rather than the link. Device files and pipes
    (`/dev/null`, a fifo) are returned as they are: `is_special` tells writers to write into them, never to replace
    them with a renamed file.

    Raises:
        OutputError: an empty name, a directory, a path under a file, or a folder this process cannot write.
    """
    text = str(path)
    if not text.strip() or Path(text) == Path("."):
        raise OutputError(f"{flag} needs a file name, got {text!r}")
    target = Path(text).expanduser()
    if target.is_symlink():
        target = target.resolve()
    if target.is_dir():
        raise OutputError(f"{flag} {text} is a directory; give a file name")
    if is_special(target):
        return target
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{flag} {text}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {text}: cannot write in {folder}")
    return target


def is_special(path: Path) -> bool:
    """Whether `path` exists and is not a regular file (a device like /dev/null, a fifo, a socket)."""
    return path.exists() and not path.is_file() and not path.is_dir()


def write_atomically(target: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(staging_path)` to produce the file, then rename it onto `target`.

    A symbolic link's target is replaced (the link stays); a device file or pipe is written into directly, since a
    rename would put a regular file in its place.

    Raises:
        OutputError: the file cannot be written (no space left, no permission): one line naming it.
    """
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    try:
        if is_special(target):
            write(target)
            return
        _write_beside(target, write)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None


def _write_beside(target: Path, write: Callable[[Path], Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    staging.chmod(0o666 & ~_umask())
    try:
        write(staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomically(target: str | Path, text: str) -> None:
    """Write UTF-8 text to `target` atomically."""
    write_atomically(target, lambda path: path.write_text(text, encoding="utf-8"))


def write_output(target: str | Path, text: str) -> None:
    """`text` to stdout when `target` is "-", else atomically to the file (what `--json FILE|-` options write)."""
    if str(target) == "-":
        import sys

        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_text_atomically(target, text)


def strict_json(value: Any, indent: int | None = None) -> str:
    """JSON text of `value` with every non-finite float (NaN, ±Infinity) written as null: valid for any parser."""
    return json.dumps(_finite_or_null(value), indent=indent, ensure_ascii=False, allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value

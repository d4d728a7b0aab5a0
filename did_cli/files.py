"""Atomic writes: a file or a folder is built under a temporary name beside its target, then renamed into place.

A reader (or a crash) therefore never sees half a checkpoint, half a tokenised corpus or half a report. Temporary
names get the permissions an ordinary `open`/`mkdir` would (tempfile makes them private), so outputs stay readable
by other users of a shared machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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


def write_atomically(target: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(staging_path)` to produce the file, then rename it onto `target`."""
    target = Path(target)
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

"""Exclusive advisory locks (`fcntl.flock`): one writer per record file, one run per folder.

The OS releases a lock when its descriptor closes or its process ends, however it ends, so a crash never leaves a
stale lock behind. `did draft --out F` locks `F.partial`; `did finetune` and `did sweep` lock `OUT/.lock`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from did_cli.errors import UsageError

__all__ = ["FOLDER_LOCK", "is_locked", "locked_folder", "try_lock"]

FOLDER_LOCK = ".lock"


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on an open file without waiting; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; file names still separate runs
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def is_locked(path: Path) -> bool:
    """Whether another process holds the lock on the existing file `path` (checked by briefly taking it)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return not try_lock(fd)
    finally:
        os.close(fd)  # releases the lock if we took it


@contextmanager
def locked_folder(folder: Path, take: bool = True, what: str = "did finetune") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if needed) for the duration of the block.

    Args:
        folder: the run folder; the lock is the file `.lock` inside it, holding the holder's pid.
        take: False on non-main processes of a multi-process run (they belong to the run holding the lock).
        what: the command holding it, for the message a second run gets.

    Raises:
        UsageError: another process holds the lock, or the folder cannot be used.
    """
    if not take:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / FOLDER_LOCK, "a+")  # noqa: SIM115 - held open for the whole block
    except OSError as exc:
        raise UsageError(f"cannot use --out {folder} as a run folder: {exc.strerror or exc}") from None
    try:
        if not try_lock(handle.fileno()):
            raise UsageError(
                f"another {what} is running in {folder} (it holds {folder / FOLDER_LOCK}); wait for it or choose "
                "another --out"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock

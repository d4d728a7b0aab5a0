"""Where outputs go and how they are written: checked targets, atomic writes, strict JSON, stdin and stdout.

A file or a folder is built under a temporary name beside its target, then renamed into place.

A reader (or a crash) therefore never sees half a checkpoint, half a tokenised corpus or half a report. Temporary
names get the permissions an ordinary `open`/`mkdir` would (tempfile makes them private), so outputs stay readable
by other users of a shared machine.

Symbolic links. An output named by a symbolic link is written to the link's target and the link stays, as a shell's
`>` does (`latest.jsonl -> runs/3/samples.jsonl` keeps pointing at the new file). did resolves the link itself before
renaming onto the target, so it applies the rule the kernel applies to `open` (Linux's `fs.protected_symlinks`): a
link in a sticky, world-writable folder (the system temp folder) is followed only when it belongs to this user or
to the folder's owner; another user's link there is refused, since that user may have planted it to make did
overwrite one of this user's files. Temporary files (`OUT.partial`) are never followed (`record_files`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from did_cli.errors import InputError, OutputError, UsageError

# As the kernel's MAXSYMLINKS: a chain of links longer than this is taken for a loop.
_MAX_LINKS = 40


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


def _planted(link: Path) -> bool:
    """Whether following `link` is refused (the rule of Linux's `fs.protected_symlinks`).

    It is when the link sits in a sticky, world-writable folder and belongs to neither this user nor the folder's owner.
    """
    if not hasattr(os, "geteuid"):  # no POSIX owners (Windows): nothing to compare
        return False
    try:
        folder = os.stat(link.parent)
        owner = _link_owner(link)
    except OSError:
        return False
    shared = folder.st_mode & stat.S_ISVTX and folder.st_mode & stat.S_IWOTH
    return bool(shared) and owner not in (os.geteuid(), folder.st_uid)


def _link_owner(link: Path) -> int:
    return os.lstat(link).st_uid


def follow_links(path: str | Path, flag: str) -> Path:
    """`path` made absolute with every symbolic link in it resolved, as `open` would resolve it (module docstring).

    Raises:
        OutputError: a loop of links, or a link another user may have planted in a sticky, world-writable folder.
    """
    start = Path(path).expanduser()
    pending = list((start if start.is_absolute() else Path.cwd() / start).parts)  # ".." kept: it follows the links
    resolved = Path(pending.pop(0))
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved.parent
            continue
        candidate = resolved / part
        if not candidate.is_symlink():
            resolved = candidate
            continue
        links += 1
        if links > _MAX_LINKS:
            raise OutputError(f"{flag} {path}: too many levels of symbolic links (a loop?)")
        if _planted(candidate):
            raise OutputError(
                f"{flag} {path}: {candidate} is a symbolic link in {resolved}, a folder anyone can write to, owned by "
                "another user; not following it (remove it or choose another name)"
            )
        target = Path(os.readlink(candidate))
        if target.is_absolute():
            resolved = Path(target.anchor)
        pending[:0] = [p for p in target.parts if p != target.anchor]
    return resolved


def output_target(path: str | Path, flag: str) -> Path:
    """Where an output named on the command line goes, checked before any work starts.

    A symbolic link is followed (`follow_links`, which checks every component of the path), so its target is
    replaced rather than the link. Device files and pipes (`/dev/null`, a fifo) are returned as they are:
    `is_special` tells writers to write into them, never to replace them with a renamed file.

    Raises:
        OutputError: an empty name, a directory, a path under a file, a folder this process cannot write, a loop of
            symbolic links, or a link another user may have planted.
    """
    text = str(path)
    if not text.strip() or Path(text) == Path("."):
        raise OutputError(f"{flag} needs a file name, got {text!r}")
    target = Path(text).expanduser()
    resolved = follow_links(target, flag)  # refuses a loop, or a planted link in any component of the path
    if target.is_symlink():
        target = resolved
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
        OutputError: the file cannot be written (no space left, no permission): one line naming it; or a link on
            its path is refused (`follow_links`).
    """
    target = Path(target)
    resolved = follow_links(target, "output")
    if target.is_symlink():
        target = resolved
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
    """`text` to stdout when `target` is "-", else atomically to the file (what `--json FILE|-` options write).

    Raises:
        OutputError: stdout is closed (`>&-`), or the file cannot be written.
    """
    if str(target) == "-":
        stream = stdout_stream("pass a file name instead of -")
        stream.write(text)
        stream.flush()
        return
    write_text_atomically(target, text)


def stdout_stream(instead: str) -> IO[str]:
    """`sys.stdout`, checked open; `instead` says what to do when it is closed (`did show x --html - >&-`).

    Raises:
        OutputError: "stdout is closed; " and `instead`.
    """
    stream = sys.stdout
    try:
        if stream is None:
            raise ValueError("no stdout")
        with contextlib.suppress(AttributeError, io.UnsupportedOperation):
            os.fstat(stream.fileno())  # an in-memory stdout (a test runner, a notebook) has no descriptor: fine
    except (OSError, ValueError):
        raise OutputError(f"stdout is closed; {instead}") from None
    return stream


def stdin_stream() -> IO[str]:
    """`sys.stdin`, checked open (`did refine <&-` starts Python without one).

    Raises:
        InputError: stdin is closed.
    """
    stream = sys.stdin
    try:
        if stream is None:
            raise ValueError("no stdin")
        with contextlib.suppress(AttributeError, io.UnsupportedOperation):
            os.fstat(stream.fileno())
    except (OSError, ValueError):
        raise InputError("stdin is closed: pipe the input in, or name a file instead of -") from None
    return stream


def check_input(source: str | Path, what: str) -> None:
    """Refuse an input file that is a folder or does not exist, before any work; "-" (stdin) passes.

    Args:
        source: the path as given.
        what: what the file should be, for the message ("a JSONL file").

    Raises:
        InputError: naming the path.
    """
    if str(source) == "-":
        return
    path = Path(source)
    if path.is_dir():
        raise InputError(f"input {source} is a directory, not {what}")
    if not path.is_file():
        raise InputError(f"input file {source} does not exist")


def open_input(source: str | Path, what: str) -> IO[str]:
    """An input file opened as UTF-8 text, or stdin (`stdin_stream`) for "-"; the caller closes a file.

    Raises:
        InputError: a folder, a missing or unreadable file, or a closed stdin.
    """
    if str(source) == "-":
        return stdin_stream()
    check_input(source, what)
    try:
        return open(source, encoding="utf-8")  # noqa: SIM115 - the caller closes it after streaming
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror}") from None


def read_input_bytes(source: str | Path, what: str) -> bytes:
    """The whole of an input file, or of stdin (`stdin_stream`) for "-", as the bytes read.

    Raises:
        InputError: a folder, a missing or unreadable file, or a closed stdin.
    """
    if str(source) == "-":
        stream = stdin_stream()
        buffer = getattr(stream, "buffer", None)  # an in-memory stdin (a test runner) may hold text only
        return buffer.read() if buffer is not None else stream.read().encode("utf-8")
    check_input(source, what)
    try:
        with open(source, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror}") from None


def refuse_overwriting_inputs(
    outputs: Iterable[tuple[str, str | Path | None]], inputs: Iterable[tuple[str, str | Path | None]]
) -> None:
    """Refuse, before any work, an output that would overwrite one of the command's inputs or another output.

    Args:
        outputs: (flag, path) of each output; None and "-" (stdout) are skipped.
        inputs: (flag or description, path) of each input file or data folder; None and "-" (stdin) are skipped. An
            output is an input when it is the same file (through a symbolic or hard link too) or an existing file
            inside an input folder (every file of a data folder is read).

    Raises:
        UsageError: naming the output and the input (or the two outputs).
    """
    named = [(flag, Path(path)) for flag, path in outputs if path is not None and str(path) != "-"]
    sources = [(label, Path(path)) for label, path in inputs if path is not None and str(path) != "-"]
    seen: list[tuple[str, Path]] = []
    for flag, out in named:
        where = _real(out)
        for label, source in sources:
            if not source.exists() or not out.exists():
                continue
            if source.is_dir() and where.is_relative_to(_real(source)) and where.is_file():
                raise UsageError(f"{flag} {out} is inside an input folder ({label} {source}); choose another output")
            if not source.is_dir() and os.path.samefile(out, source):
                which = label if str(source) == str(out) else f"{label} {source}"
                raise UsageError(f"{flag} {out} is an input ({which}); choose another output file")
        for other_flag, other in seen:
            if where == _real(other):
                raise UsageError(f"{other_flag} and {flag} name the same file ({out})")
        seen.append((flag, out))


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a loop of links: compared as written (output_target refuses it)
        return Path(os.path.abspath(path))


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

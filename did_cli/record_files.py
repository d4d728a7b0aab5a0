"""Record files on disk: the locked line-by-line writer, what an interrupted file keeps, one output across processes.

* `RecordWriter` writes one flushed line per record to stdout, or to `OUT.partial`, locked while it is written and
  renamed onto `OUT` only when the run finishes: an interrupted run leaves `OUT` untouched and every finished sample
  in `OUT.partial`.
* `read_complete_records` is the one rule for what an interrupted file keeps: a torn last line (no newline: a kill
  in the middle of a write) is dropped without a word; a complete last line that does not parse (garbage, NaN, bytes
  that are not UTF-8) is dropped with a note naming it; a bad line before it is corruption and refused.
* `RecordOutput` is where one process's records go when a launcher started several: each writes its part
  `OUT.partR-of-W(.partial)` beside `OUT`, and when every part is finished the main process puts the records back in
  position order and writes `OUT` atomically. Part files of another process count are refused by name (resume them
  with that count); a finished `OUT` is resumed by any count, each process keeping the records it owns.

Whether the kept records were made with this run's inputs and settings is not decided here but by
`did_cli.provenance.made_with`, which every resume and the sweep call.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from did_cli.errors import DidError, InputError, OutputError, UsageError
from did_cli.files import is_special, output_target, stdout_stream
from did_cli.locks import is_locked, try_lock
from did_cli.processes import ONE_PROCESS, Processes
from did_cli.provenance import Expected, made_with
from did_cli.records import Record, parse_record

__all__ = [
    "PARTIAL_SUFFIX",
    "CompleteRecords",
    "RecordOutput",
    "RecordWriter",
    "part_path",
    "read_complete_records",
]

PARTIAL_SUFFIX = ".partial"
PositionFn = Callable[[Record], int]


# --- What an interrupted file keeps ---------------------------------------------------------------------------------


@dataclass
class CompleteRecords:
    """The records an interrupted file keeps.

    Attributes:
        records: the complete, valid records in file order.
        size: bytes they occupy, where writing continues.
        dropped: a sentence naming a complete last line that was dropped, or None.
    """

    records: list[Record]
    size: int
    dropped: str | None = None


def read_complete_records(path: Path) -> CompleteRecords:
    """The records of a file an interrupted run may have cut short (the module docstring gives the rule).

    Raises:
        InputError: a malformed line that is not the last complete one (corruption, not an interruption).
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete = lines[:-1]  # what follows the final newline is empty, or a torn line: dropped without a word
    torn = bool(lines[-1])
    records: list[Record] = []
    size = 0
    for lineno, raw in enumerate(complete, start=1):
        if raw.strip():
            try:
                records.append(parse_record(raw.decode("utf-8"), f"{path} line {lineno}"))
            except (InputError, UnicodeDecodeError) as exc:
                if lineno == len(complete) and not torn:
                    reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc).split(": ", 1)[-1]
                    return CompleteRecords(
                        records, size, f"dropped line {lineno} of {path} ({reason}); it is made again"
                    )
                raise InputError(f"cannot resume from {path}: {exc}") from None
        size += len(raw) + 1
    return CompleteRecords(records, size)


# --- One file ---------------------------------------------------------------------------------------------------------


class RecordWriter:
    """Writes records one flushed line at a time to stdout, or to a file replaced only when the run finishes.

    File output is written to `<out>.partial`, which is created and locked when the writer opens, so a missing
    permission, a directory given as `--out` or a second run writing the same file fails in one line before any
    work. Each record is one `write` of a whole line; a failed write (disk full) is cut back so no partial JSON line
    is left. `commit()` (called by a clean `with` exit) makes the file durable and renames it onto `out`; a run that
    stops early leaves `out` untouched and its finished records in `<out>.partial`, which `resume=True` continues.

    Attributes:
        count: records written by this writer (kept records of a resumed run not included).
        kept: the complete records a resumed run found (in its partial file, else in a finished `out`) or adopted.
        dropped: a note naming a complete but invalid last line a resumed run dropped (`read_complete_records`).
    """

    def __init__(
        self,
        out: str | Path | None = None,
        *,
        resume: bool = False,
        replace_partial: bool = False,
        how_to_continue: str = "--resume continues",
    ) -> None:
        self.path = None if out is None or str(out) == "-" else Path(out)
        self.partial = (
            None if self.path is None or not self.path.name else self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        )
        self.resume = resume
        self.replace_partial = replace_partial
        self.how_to_continue = how_to_continue
        self.count = 0
        self.kept: list[Record] = []
        self.dropped: str | None = None
        self._fd: int | None = None
        self._stream: IO[str] | None = None  # stdout without a file descriptor (pytest, notebooks)
        self._offset = 0
        self._done = False
        self._only_copies = False  # the partial file only repeats finished records (a resumed finished run)
        self._special = False  # `out` is a device or pipe, written into directly

    # --- opening ------------------------------------------------------------------------------------------------

    def open(self) -> RecordWriter:
        """Create and lock the output (or check stdout) so every problem shows before the work starts."""
        if self.path is None:
            if self.resume:
                raise UsageError("--resume needs --out FILE: records already sent to stdout cannot be read back")
            self._fd, self._stream = _stdout()
            return self
        self.path = output_target(self.path, "--out")  # a symlink's target; refuses '', folders, unwritable places
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        if is_special(self.path):
            return self._open_special()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Never through a symbolic link: the partial file is did's own, and a link planted there would make a
            # resumed run write into (and then rename away) whatever it points at.
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(self.partial, flags, 0o666)
        except OSError as exc:
            if self.partial.is_symlink():
                raise OutputError(
                    f"{self.partial} is a symbolic link, not a partial file did wrote; remove it and run again"
                ) from None
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a fifo or device planted as the partial file
            os.close(fd)
            raise OutputError(f"{self.partial} is not a regular file, not a partial file did wrote; remove it")
        if not try_lock(fd):
            os.close(fd)
            raise OutputError(f"another did run is writing {self.path} (it holds {self.partial}); wait or pick --out")
        self._fd = fd
        try:
            self._adopt_existing()
        except BaseException:
            self._close()  # a partial file that cannot be resumed: release it (and the lock) untouched
            raise
        return self

    def _open_special(self) -> RecordWriter:
        # /dev/null, a fifo: written into line by line like stdout; renaming a file onto it would replace the device.
        assert self.path is not None
        if self.resume:
            raise UsageError(f"--resume needs a regular file as --out, not {self.path}")
        try:
            self._fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        self.partial, self._special = None, True
        return self

    def _adopt_existing(self) -> None:
        assert self._fd is not None and self.partial is not None and self.path is not None
        size = os.fstat(self._fd).st_size
        if self.resume:
            if size:
                found = read_complete_records(self.partial)
                self.kept, self._offset, self.dropped = found.records, found.size, found.dropped
            os.ftruncate(self._fd, self._offset)
            os.lseek(self._fd, self._offset, os.SEEK_SET)
            if not size and self.path.is_file():
                self.adopt(read_complete_records(self.path).records)
            return
        if size and not self.replace_partial:
            raise OutputError(
                f"{self.partial} holds the finished samples of an interrupted run: pass --resume to continue it, "
                "or delete it"
            )
        os.ftruncate(self._fd, 0)

    def adopt(self, records: Iterable[Record]) -> None:
        """Carry finished records over from a finished file: written first, counted as kept, not as new."""
        count = self.count
        for record in records:
            self.write(record)
            self.kept.append(record)
        self.count = count
        self._only_copies = True

    def restart(self) -> None:
        """Forget the kept records and start the file afresh (its records were found to be made otherwise)."""
        if self._fd is not None and self.path is not None and not self._special:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
        self.kept, self._offset, self._only_copies, self.dropped = [], 0, False, None

    # --- writing ------------------------------------------------------------------------------------------------

    def write(self, record: Record) -> None:
        """Append one record as one line; nothing of it stays behind if the write fails.

        Raises:
            OutputError: the record holds a non-finite number, or the write failed (disk full, closed output).
        """
        if self._fd is None and self._stream is None:
            self.open()
        try:
            line = record.to_json() + "\n"
        except ValueError:
            raise OutputError(
                f"sample {record.id} holds NaN or infinite numbers (the model's outputs are not finite); not written"
            ) from None
        foreign = record.foreign_token()
        if foreign is not None:
            size = record.tokenizer["vocab_size"]
            raise OutputError(
                f"sample {record.id} holds token id {foreign}, outside its tokenizer's {size} ids ([MASK] or padding: "
                "the model's outputs went wrong); not written"
            )
        if self._stream is not None:
            self._stream.write(line)
            self._stream.flush()
            self.count += 1
            return
        assert self._fd is not None
        data = line.encode("utf-8")
        offset = self._position()
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except BrokenPipeError:
            raise
        except OSError as exc:
            self._cut_back(offset)
            where = "stdout" if self.path is None else str(self.partial or self.path)
            raise OutputError(f"writing to {where} failed: {exc.strerror}; {self._kept_note()}") from None
        self._offset = offset + len(data) if offset is not None else 0
        self.count += 1

    def _position(self) -> int | None:
        assert self._fd is not None
        if self.path is not None and not self._special:
            return self._offset
        try:
            return os.lseek(self._fd, 0, os.SEEK_CUR)  # a regular file behind stdout can be cut back
        except OSError:
            return None  # a pipe or a terminal

    def _cut_back(self, offset: int | None) -> None:
        if offset is None or self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, offset)
            os.lseek(self._fd, offset, os.SEEK_SET)

    # --- finishing ----------------------------------------------------------------------------------------------

    def commit(self) -> None:
        """Make the output durable and put it in place of `out` (stdout: nothing to do)."""
        if self._done:
            return
        if self._fd is None and self._stream is None:
            self.open()
        self._done = True
        if self.path is None:
            return
        if self._special:
            self._close()
            return
        assert self._fd is not None and self.partial is not None
        try:
            os.fsync(self._fd)
            os.replace(self.partial, self.path)
        except OSError as exc:
            raise OutputError(f"cannot finish {self.path}: {exc.strerror}; {self._kept_note()}") from None
        finally:
            self._close()

    def abort(self) -> str | None:
        """Stop without replacing `out`; returns a sentence saying what was kept (None when nothing was)."""
        if self._done:
            return None
        self._done = True
        if self.path is None or self._fd is None or self._special:
            self._close()
            return None
        assert self.partial is not None
        empty = self._offset == 0 or (self._only_copies and self.count == 0)
        self._close()
        if empty:
            with contextlib.suppress(OSError):
                self.partial.unlink()
            return None
        return self._kept_note()

    def _kept_note(self) -> str:
        if self.path is None or self._special:
            return f"{self.count} finished samples were written before it"
        total = len(self.kept) + self.count
        kept = f"{total} finished samples are kept in {self.partial}"
        return f"{kept} ({self.path} is unchanged; {self.how_to_continue})"

    def _close(self) -> None:
        if self._fd is not None and self.path is not None:
            os.close(self._fd)  # also releases the lock
        self._fd = None

    def __enter__(self) -> RecordWriter:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _stdout() -> tuple[int | None, IO[str] | None]:
    """Where stdout records go: its file descriptor (whole-line writes), or the stream itself when it has none."""
    stream = stdout_stream("pass --out FILE")
    try:
        stream.flush()
        return stream.fileno(), None
    except (ValueError, OSError, AttributeError):
        return None, stream  # an in-memory stdout (a test runner, a notebook)


# --- One output across processes --------------------------------------------------------------------------------------


def part_path(out: Path, rank: int, world: int) -> Path:
    """Where process `rank` of `world` writes its records while the run goes on (beside `out`)."""
    return out.with_name(f"{out.name}.part{rank}-of-{world}")


def _leftovers(out: Path) -> dict[int, list[Path]]:
    """Unmerged files of earlier runs beside `out`, by the process count that wrote them (1: `OUT.partial`)."""
    found: dict[int, list[Path]] = {}
    pattern = re.compile(re.escape(out.name) + r"\.part(\d+)-of-(\d+)(\.partial)?")
    if out.parent.is_dir():
        for path in sorted(out.parent.iterdir()):
            match = pattern.fullmatch(path.name)
            if match and path.is_file():
                found.setdefault(int(match.group(2)), []).append(path)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if partial.is_file() and partial.stat().st_size:
        found.setdefault(1, []).append(partial)
    return found


@dataclass
class RecordOutput:
    """Where this process's records go: `--out`, stdout, or its part file beside `--out` when several processes run.

    Open it before any work (`with RecordOutput(...) as output:`): it checks and locks the file, finds what an
    interrupted run kept (`kept`), and refuses what it cannot continue, in one line agreed by every process. Records
    written through it are streamed line by line; a clean exit finishes the output (with several processes the main
    process merges every part into `out` in position order), an exception leaves every finished sample on disk and
    adds what was kept to the error.

    Attributes:
        out: the final output file (None: stdout).
        processes: the processes sharing the work.
        resume: keep the finished records of an interrupted or finished run.
        position: an input position per record (its id for draft and generate; the input record's place for refine):
            which process owns it, and the order of `out`.
        notes: lines worth telling the user (a dropped damaged line).
        how_to_continue: what continues an interrupted run, for the line saying what was kept.
    """

    out: Path | None
    processes: Processes = ONE_PROCESS
    resume: bool = False
    position: PositionFn = field(default=lambda record: record.id)
    notes: list[str] = field(default_factory=list)
    how_to_continue: str = "--resume continues"

    def __post_init__(self) -> None:
        if self.out is not None and str(self.out) == "-":
            self.out = None
        world = self.processes.world
        target = self.out if world == 1 or self.out is None else part_path(self.out, self.processes.shard.rank, world)
        self.writer = RecordWriter(target, resume=self.resume, how_to_continue=self.how_to_continue)

    @property
    def kept(self) -> list[Record]:
        """This process's records from the interrupted (or finished) run it continues."""
        return self.writer.kept

    @property
    def kept_ids(self) -> set[int]:
        """Their ids."""
        return {record.id for record in self.writer.kept}

    def open(self) -> RecordOutput:
        """Check, create and lock the output; raise one agreed error if any process cannot continue."""
        problem: DidError | None = None
        if self.processes.world > 1 and self.out is None:
            problem = UsageError(
                f"with {self.processes.world} processes, pass --out FILE: each writes a part, merged there"
            )
        elif self.out is not None:
            problem = self._foreign_layout()
        if problem is None:
            try:
                self.writer.open()
                self._adopt_finished_out()
            except DidError as exc:
                problem = exc
        try:
            self.processes.agree(problem)
        except DidError:
            self.writer.abort()
            raise
        if self.writer.dropped:
            self.notes.append(self.writer.dropped)
        return self

    def _foreign_layout(self) -> DidError | None:
        """Unmerged files written by another process count than this run's: named, never silently redone."""
        assert self.out is not None
        world = self.processes.world
        others = {count: paths for count, paths in _leftovers(Path(self.out)).items() if count != world}
        if not others:
            return None
        count, paths = next(iter(sorted(others.items())))
        names = ", ".join(path.name for path in paths)
        busy = next((path for path in paths if is_locked(path)), None)
        if busy is not None:
            return OutputError(f"another did run is writing {self.out} (it holds {busy}); wait or pick --out")
        runs = "a one-process run" if count == 1 else f"a {count}-process run"
        how = f"resume it with {count} process{'es' if count > 1 else ''}"
        if not self.resume:
            return OutputError(
                f"{names} hold{'s' if len(paths) == 1 else ''} finished samples of {runs}: {how} and --resume, or "
                "delete them"
            )
        verb = "was" if len(paths) == 1 else "were"
        return UsageError(
            f"cannot resume: {names} {verb} written by {runs}, this run has {world}; {how}, or delete them"
        )

    def _adopt_finished_out(self) -> None:
        """Several processes resuming a finished `out`: each carries over the records it owns (in position order)."""
        if not self.resume or self.processes.world == 1 or self.writer.kept or self.out is None:
            return
        out = Path(self.out)
        if out.is_file():
            records = read_complete_records(out).records
            self.writer.adopt(r for r in records if self.processes.owns(self.position(r)))

    def check_kept(self, expected: Expected) -> set[int]:
        """The ids of the kept records, after checking they were made as this run makes them.

        The check is `provenance.made_with`, the one rule every reuse of records follows; every process checks its
        own share and all refuse together.

        Raises:
            InputError: `cannot resume: ` and the first difference, in one line.
        """
        difference = made_with(self.kept, expected)
        self.processes.agree(None if difference is None else InputError(f"cannot resume: {difference}"))
        return self.kept_ids

    def restart(self) -> None:
        """Drop what the interrupted run kept and start this process's file afresh."""
        self.writer.restart()

    def write(self, record: Record) -> None:
        """Write one finished record (one flushed line)."""
        self.writer.write(record)

    def others_done(self) -> int:
        """Records the other processes have written so far (read from their part files, for one progress bar)."""
        world = self.processes.world
        if self.out is None or world == 1:
            return 0
        done = 0
        for rank in range(world):
            if rank == self.processes.shard.rank:
                continue
            path = part_path(Path(self.out), rank, world)
            for candidate in (path, path.with_name(path.name + PARTIAL_SUFFIX)):
                with contextlib.suppress(OSError):
                    done += candidate.read_bytes().count(b"\n")
        return done

    def finish(self) -> list[Record] | None:
        """Commit this process's file; with several processes, merge every part into `out` (main process).

        Returns:
            On the main process of a multi-process run, every record of `out`, else None.

        Raises:
            UsageError: the parts do not hold every position exactly once (rerun with --resume).
        """
        self.writer.commit()
        if self.processes.world == 1:
            return None
        self.processes.barrier()
        merged = None
        problem: DidError | None = None
        if self.processes.is_main:
            try:
                merged = self._merge()
            except DidError as exc:
                problem = exc
        self.processes.agree(problem)
        return merged

    def _merge(self) -> list[Record]:
        assert self.out is not None
        out, world = Path(self.out), self.processes.world
        paths = [part_path(out, rank, world) for rank in range(world)]
        records = [r for path in paths if path.is_file() for r in read_complete_records(path).records]
        records.sort(key=self.position)
        positions = [self.position(r) for r in records]
        if positions != list(range(len(records))):
            raise UsageError(f"the parts of {out} do not hold every sample exactly once; rerun with --resume")
        with RecordWriter(out, replace_partial=True, how_to_continue=self.how_to_continue) as writer:
            for record in records:
                writer.write(record)
        for path in paths:
            path.unlink(missing_ok=True)
        return records

    def abort(self) -> str | None:
        """Stop, keeping every finished record; returns a sentence saying what was kept (None when nothing was)."""
        return self.writer.abort()

    def __enter__(self) -> RecordOutput:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

"""Sample records: the JSONL that `draft`, `refine` and `generate` write and `refine`, `eval-ppl`, `show` read.

One JSON object per line, written and flushed as soon as a sample is finished, so an interrupted run keeps every
finished sample and `did draft | did refine` streams. Fields:

* `id` (int), `seed` (the draft's seed): sample `id` depends only on (seed, id);
* `tokens` (the whole sequence, prompt and BOS included), `confidence` (same length; 1.0 at prompt positions,
  otherwise the probability the model gave the token at the call that committed it, updated by each refinement);
* `prompt_len`, `prompt` (decoded prompt text without BOS, or null), `text` (decoded generated part);
* `draft_tokens`: the stage-1 tokens, kept unchanged through refinements so what changed can always be shown;
* `stages`: one entry per stage with its settings, `nfes`, `seconds` and, for refinements, the `remasked` positions;
* `model`, `tokenizer`, `versions`, `device`, `dtype`: provenance.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from did_cli.errors import InputError, OutputError, UsageError
from did_cli.files import is_special, output_target

_REQUIRED = ("id", "tokens", "confidence", "prompt_len")
_NULLABLE = ("prompt", "draft_tokens")
PARTIAL_SUFFIX = ".partial"


@dataclass
class Record:
    """One sample and everything needed to reproduce or continue it."""

    id: int
    tokens: list[int]
    confidence: list[float]
    prompt_len: int
    seed: int = 0
    text: str = ""
    prompt: str | None = None
    draft_tokens: list[int] | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None

    def to_json(self) -> str:
        """One line of JSON (confidences to 7 significant digits, the precision of float32)."""
        body = asdict(self)
        body["confidence"] = [float(f"{c:.7g}") for c in self.confidence]
        # allow_nan=False: NaN and Infinity are not JSON, and a reader would choke on them later.
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    @property
    def generated(self) -> list[int]:
        """Token ids after the prompt."""
        return self.tokens[self.prompt_len :]


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity, which are not JSON; a record holding them is corrupt.
    raise ValueError(f"{name} is not valid JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(body: dict[str, Any], where: str) -> None:
    """Type and range checks for every field a command reads; each failure is one sentence naming the field."""
    tokens, confidence, prompt_len = body["tokens"], body["confidence"], body["prompt_len"]
    if not _is_int(body["id"]) or body["id"] < 0:
        raise InputError(f"{where}: id must be a non-negative integer, got {body['id']!r:.40}")
    if "seed" in body and not _is_int(body["seed"]):
        raise InputError(f"{where}: seed must be an integer, got {body['seed']!r:.40}")
    if not isinstance(tokens, list) or not tokens or not all(_is_int(t) and t >= 0 for t in tokens):
        raise InputError(f"{where}: tokens must be a non-empty list of non-negative integers")
    if not isinstance(confidence, list) or len(confidence) != len(tokens):
        raise InputError(f"{where}: confidence must be a list as long as tokens ({len(tokens)})")
    if not all(_is_number(c) and 0.0 <= c <= 1.0 for c in confidence):
        raise InputError(f"{where}: confidence must hold finite probabilities in [0, 1]")
    if not _is_int(prompt_len) or not 0 <= prompt_len < len(tokens):
        raise InputError(f"{where}: prompt_len must be an integer from 0 to the number of tokens - 1")
    draft_tokens = body.get("draft_tokens")
    if draft_tokens is not None and (
        not isinstance(draft_tokens, list) or not all(_is_int(t) and t >= 0 for t in draft_tokens)
    ):
        raise InputError(f"{where}: draft_tokens must be a list of non-negative integers or null")
    stages = body.get("stages", [])
    if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
        raise InputError(f"{where}: stages must be a list of objects")
    for key in ("model", "tokenizer", "versions"):
        if not isinstance(body.get(key, {}), dict):
            raise InputError(f"{where}: {key} must be an object, got {type(body[key]).__name__}")
    for key in ("text", "prompt", "device", "dtype"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(f"{where}: {key} must be a string, got {type(value).__name__}")


def parse_record(line: str, where: str) -> Record:
    """A Record from one JSONL line; `where` ("input.jsonl line 3") prefixes every error message.

    Raises:
        InputError: the line is not JSON (NaN and Infinity included), not an object, lacks a required field, or a
            field has the wrong type or range.
    """
    try:
        body = json.loads(line, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise InputError(f"{where}: not valid JSON ({reason}; truncated?)") from None
    if not isinstance(body, dict):
        raise InputError(f"{where}: expected a JSON object")
    missing = [key for key in _REQUIRED if key not in body]
    if missing:
        raise InputError(f"{where}: record lacks {', '.join(missing)} (is it a did sample record?)")
    _check_fields(body, where)
    known = set(Record.__dataclass_fields__)
    # A null optional field means its default (text "" and so on); prompt and draft_tokens are null by design.
    return Record(**{k: v for k, v in body.items() if k in known and (v is not None or k in _NULLABLE)})


def _open_input(source: str | Path) -> tuple[str, IO[str]]:
    name = "stdin" if str(source) == "-" else str(source)
    if str(source) == "-":
        return name, sys.stdin
    path = Path(source)
    if path.is_dir():
        raise InputError(f"input {name} is a directory, not a JSONL file")
    if not path.is_file():
        raise InputError(f"input file {name} does not exist")
    try:
        return name, open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller after streaming
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None


def read_records(source: str | Path) -> Iterator[Record]:
    """Records from a JSONL file, or from stdin when `source` is "-"; blank lines are skipped.

    Raises:
        InputError: a malformed line (naming its number), a file that is not UTF-8 or cannot be read, or an input
            with no record at all.
    """
    name, stream = _open_input(source)
    count = 0
    try:
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            count += 1
            yield parse_record(line, f"{name} line {lineno}")
    except UnicodeDecodeError:
        raise InputError(f"{name} is not UTF-8 text") from None
    finally:
        if stream is not sys.stdin:
            stream.close()
    if count == 0:
        raise InputError(f"{name} holds no records")


def check_records_file(source: str | Path) -> int:
    """Read a whole records file once to find any malformed line before work starts; returns the record count.

    stdin ("-") cannot be read twice and is not checked (returns 0): its records are checked as they stream.
    """
    if str(source) == "-":
        return 0
    return sum(1 for _ in read_records(source))


def read_complete_records(path: Path) -> tuple[list[Record], int]:
    """The records of a file that an interrupted run may have cut short, and the byte length they occupy.

    A last line without its newline, or one that does not parse, is what a kill in the middle of a write leaves:
    it is dropped. A malformed line before the last one is corruption, not an interruption, and is an error.

    Raises:
        InputError: a malformed line that is not the last one.
    """
    data = path.read_bytes()
    records: list[Record] = []
    good = 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        is_last = lineno == len(lines)
        if is_last:  # what follows the final newline: empty, or a torn line
            break
        if raw.strip():
            try:
                records.append(parse_record(raw.decode("utf-8"), f"{path} line {lineno}"))
            except (InputError, UnicodeDecodeError) as exc:
                if lineno == len(lines) - 1 and not lines[-1]:
                    # The last complete line itself is damaged: treat it as torn too.
                    break
                raise InputError(f"cannot resume from {path}: {exc}") from None
        good += len(raw) + 1
    return records, good


class RecordWriter:
    """Writes records one flushed line at a time to stdout, or to a file replaced only when the run finishes.

    File output is written to `<out>.partial`, which is created and locked when the writer opens, so a missing
    permission, a directory given as `--out` or a second run writing the same file fails in one line before any
    work. Each record is one `write` of a whole line; a failed write (disk full) is cut back so no partial JSON line
    is left. `commit()` (called by a clean `with` exit) makes the file durable and renames it onto `out`; a run that
    stops early leaves `out` untouched and its finished records in `<out>.partial`, which `resume=True` continues.

    Attributes:
        count: records written by this writer (kept records of a resumed run not included).
        kept: the complete records a resumed run found and carried over.
    """

    def __init__(self, out: str | Path | None = None, *, resume: bool = False, replace_partial: bool = False) -> None:
        self.path = None if out is None or str(out) == "-" else Path(out)
        self.partial = (
            None if self.path is None or not self.path.name else self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        )
        self.resume = resume
        self.replace_partial = replace_partial
        self.count = 0
        self.kept: list[Record] = []
        self._fd: int | None = None
        self._stream: IO[str] | None = None  # stdout without a file descriptor (pytest, notebooks)
        self._offset = 0
        self._done = False
        self._copy_of_out = False  # the partial file only repeats a finished `out` (a resumed finished run)
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
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        if not _lock(fd):
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
                self.kept, self._offset = read_complete_records(self.partial)
            elif self.path.is_file():
                self.kept, self._offset = read_complete_records(self.path)
                os.write(self._fd, self.path.read_bytes()[: self._offset])
                self._copy_of_out = True
            os.ftruncate(self._fd, self._offset)
            os.lseek(self._fd, self._offset, os.SEEK_SET)
            return
        if size and not self.replace_partial:
            raise OutputError(
                f"{self.partial} holds the finished samples of an interrupted run: pass --resume to continue it, "
                "or delete it"
            )
        os.ftruncate(self._fd, 0)

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
        empty = self._offset == 0 or (self._copy_of_out and self.count == 0)
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
        return f"{total} finished samples are kept in {self.partial} ({self.path} is unchanged; --resume continues)"

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
    stream = sys.stdout
    if stream is None:
        raise OutputError("stdout is closed; pass --out FILE")
    try:
        stream.flush()
        fd = stream.fileno()
    except (ValueError, OSError, AttributeError):
        return None, stream  # an in-memory stdout (a test runner, a notebook)
    try:
        os.fstat(fd)
    except OSError:
        raise OutputError("stdout is closed; pass --out FILE") from None
    return fd, None


def _lock(fd: int) -> bool:
    """An exclusive advisory lock, released by the OS when the process ends however it ends."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the partial file name still separates runs
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def same_file(first: str | Path | None, second: str | Path | None) -> bool:
    """Whether two paths name the same existing file (writing one would destroy the other)."""
    if first is None or second is None or str(first) == "-" or str(second) == "-":
        return False
    a, b = Path(first), Path(second)
    return a.exists() and b.exists() and a.samefile(b)

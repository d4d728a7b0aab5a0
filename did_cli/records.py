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

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from did_cli.errors import InputError

_REQUIRED = ("id", "tokens", "confidence", "prompt_len")


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
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))

    @property
    def generated(self) -> list[int]:
        """Token ids after the prompt."""
        return self.tokens[self.prompt_len :]


def parse_record(line: str, where: str) -> Record:
    """A Record from one JSONL line; `where` ("input.jsonl line 3") prefixes every error message."""
    try:
        body = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg}; truncated?)") from None
    if not isinstance(body, dict):
        raise InputError(f"{where}: expected a JSON object")
    missing = [key for key in _REQUIRED if key not in body]
    if missing:
        raise InputError(f"{where}: record lacks {', '.join(missing)} (is it a did sample record?)")
    tokens, confidence, prompt_len = body["tokens"], body["confidence"], body["prompt_len"]
    if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
        raise InputError(f"{where}: tokens must be a list of non-negative integers")
    if not isinstance(confidence, list) or len(confidence) != len(tokens):
        raise InputError(f"{where}: confidence must be a list as long as tokens ({len(tokens)})")
    if not all(isinstance(c, int | float) for c in confidence):
        raise InputError(f"{where}: confidence must hold numbers")
    if not isinstance(prompt_len, int) or not 0 <= prompt_len <= len(tokens):
        raise InputError(f"{where}: prompt_len must be an integer between 0 and the number of tokens")
    known = set(Record.__dataclass_fields__)
    return Record(**{k: v for k, v in body.items() if k in known})


def read_records(source: str | Path) -> Iterator[Record]:
    """Records from a JSONL file, or from stdin when `source` is "-"; blank lines are skipped.

    Raises:
        InputError: a malformed line (naming its number) or an input with no record at all.
    """
    name = "stdin" if str(source) == "-" else str(source)
    if str(source) == "-":
        stream: IO[str] = sys.stdin
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"input file {name} does not exist")
        stream = open(path, encoding="utf-8")  # noqa: SIM115 - closed in the finally below, after streaming
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


class RecordWriter:
    """Writes records one line at a time, flushing each, to stdout or a file.

    A file is written line by line as samples finish, so Ctrl-C keeps every finished sample.
    """

    def __init__(self, out: str | Path | None = None) -> None:
        self._path = None if out is None or str(out) == "-" else Path(out)
        self._stream: IO[str] | None = sys.stdout if self._path is None else None
        self.count = 0

    def write(self, record: Record) -> None:
        """Append one record and flush it.

        The file is created at the first record, so a run that fails before producing anything leaves an existing
        file untouched.
        """
        if self._stream is None:
            assert self._path is not None
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(self._path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._stream.write(record.to_json() + "\n")
        self._stream.flush()
        self.count += 1

    def close(self) -> None:
        """Close the file (stdout stays open)."""
        if self._path is not None and self._stream is not None:
            self._stream.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def same_file(first: str | Path | None, second: str | Path | None) -> bool:
    """Whether two paths name the same existing file (writing one would destroy the other)."""
    if first is None or second is None or str(first) == "-" or str(second) == "-":
        return False
    a, b = Path(first), Path(second)
    return a.exists() and b.exists() and a.samefile(b)

"""Samples to score: reading sample files, and the one rule that turns a record into a judged sample.

A `.txt` file holds one sample per line; anything else is JSONL whose objects have a `text` string and optionally a
`prompt` and an `id`; did's sample records are such objects and are checked field by field. A file is read whole
(`read_sample_file`), so the sha256 of the very bytes scored (stdin's too) can be recorded. `sample_from_record`
is the only place a record becomes a Sample: every gen PPL, entropy or MAUVE figure (`did eval-ppl`, the sweep)
scores records through it, so they all apply the same cut: a record is cut to the length it was sampled at (its
draft stage's `length`, else its token count), as upstream re-tokenises with `max_length=model.length`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from did_cli.errors import InputError
from did_cli.files import read_input_bytes
from did_cli.records import Record, parse_record

__all__ = [
    "Sample",
    "SampleFile",
    "read_reference",
    "read_reference_file",
    "read_sample_file",
    "read_samples",
    "sample_from_record",
    "sampled_length",
]


@dataclass(frozen=True)
class Sample:
    """One text to score, with an optional prompt that conditions it without being scored.

    `max_tokens` is the length the text was sampled at (a did record's draft length), used to cut it as upstream.
    """

    text: str
    prompt: str | None = None
    line: int | None = None
    id: Any = None
    max_tokens: int | None = None


def sampled_length(record: Record) -> int:
    """The length a record was sampled at: its draft stage's `length`, else its token count (the cut upstream uses)."""
    first = record.stages[0] if record.stages else {}
    length = first.get("length")
    return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else len(record.tokens)


def sample_from_record(record: Record, line: int | None = None) -> Sample:
    """The sample every gen PPL, entropy and MAUVE figure scores for a record.

    Its text, conditioned on its prompt, cut at the length it was sampled at (`sampled_length`).
    """
    return Sample(record.text, record.prompt, line, record.id, sampled_length(record))


@dataclass(frozen=True)
class SampleFile:
    """The samples of one input and the sha256 (hex) of the bytes they were read from."""

    samples: list[Sample]
    sha256: str


def read_samples(source: str | Path) -> list[Sample]:
    """Samples from a file, or from stdin when `source` is "-" (`read_sample_file` without the digest)."""
    return read_sample_file(source).samples


def read_sample_file(source: str | Path) -> SampleFile:
    """Samples from a file, or from stdin when `source` is "-", with the sha256 of the bytes read.

    A `.txt` file holds one sample per line. Anything else is JSONL whose objects have a `text` string and
    optionally a `prompt` (string or null) and an `id`; did's sample records are such objects. Blank lines are
    skipped.

    Raises:
        InputError: a missing or non-UTF-8 file, a malformed line (naming its number), or no sample at all.
    """
    name = "stdin" if str(source) == "-" else str(source)
    plain = Path(str(source)).suffix.lower() == ".txt"
    data = read_input_bytes(source, "a samples file")
    samples = []
    # Lines as a text file gives them (universal newlines), from the bytes the digest is of.
    stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    try:
        for lineno, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            if plain:
                samples.append(Sample(line.rstrip("\r\n"), line=lineno))
            else:
                samples.append(_parse_sample(line, name, lineno, first=not samples))
    except UnicodeDecodeError:
        raise InputError(f"{name} is not UTF-8 text") from None
    if not samples:
        raise InputError(f"{name} holds no samples")
    return SampleFile(samples, hashlib.sha256(data).hexdigest())


def _parse_sample(line: str, name: str, lineno: int, first: bool) -> Sample:
    where = f"{name} line {lineno}"
    try:
        body = json.loads(line)
    except json.JSONDecodeError as exc:
        hint = "; for plain text with one sample per line, name the file .txt" if first else "; truncated?"
        raise InputError(f"{where}: not valid JSON ({exc.msg}{hint})") from None
    if not isinstance(body, dict):
        raise InputError(f"{where}: expected a JSON object with a text field")
    # A did sample record is checked field by field, as refine and show check it, and scored as every record is.
    record = parse_record(line, where) if "tokens" in body or "confidence" in body else None
    text, prompt = body.get("text"), body.get("prompt")
    if not isinstance(text, str):
        raise InputError(f"{where}: no text field (a string) to score")
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"{where}: prompt must be a string or null")
    return sample_from_record(record, lineno) if record is not None else Sample(text, prompt, lineno, body.get("id"))


def read_reference(source: str | Path) -> list[Sample]:
    """MAUVE's reference texts (`read_reference_file` without the digest)."""
    return read_reference_file(source).samples


def read_reference_file(source: str | Path) -> SampleFile:
    """MAUVE's reference texts, read like any input (`read_sample_file`); errors say the file was the `--reference`.

    Raises:
        InputError: as `read_sample_file`, the message starting with `--reference:`.
    """
    try:
        return read_sample_file(source)
    except InputError as exc:
        raise InputError(f"--reference: {exc}") from None

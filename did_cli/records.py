"""Sample records: the JSONL schema that `draft`, `refine` and `generate` write and `refine`, `eval-ppl`, `show` read.

One JSON object per line, written and flushed as soon as a sample is finished (`did_cli.record_files`), so an
interrupted run keeps every finished sample and `did draft | did refine` streams. Fields:

* `id` (int), `seed` (the draft's seed): sample `id` depends only on (seed, id);
* `tokens` (the whole sequence, prompt and BOS included), `confidence` (same length; 1.0 at prompt positions,
  otherwise the probability the model gave the token at the call that committed it, updated by each refinement);
* `prompt_len`, `prompt` (decoded prompt text without BOS, or null), `text` (decoded generated part);
* `entropy`, `margin` (same length, or null in records of earlier versions): the entropy (nats) and the top-1 minus
  top-2 probability of the distribution each token was committed from, read off the same call as `confidence`;
* `draft_tokens`: the stage-1 tokens, kept unchanged through refinements so what changed can always be shown;
* `stages`: one entry per stage with its settings, `nfes`, `seconds` and, for refinements, the `remasked` positions;
* `model`, `tokenizer`, `versions`, `device`, `dtype`: provenance.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from did_cli.errors import InputError
from did_cli.files import open_input

_REQUIRED = ("id", "tokens", "confidence", "prompt_len")
_NULLABLE = ("prompt", "draft_tokens", "entropy", "margin")


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
    entropy: list[float] | None = None
    margin: list[float] | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None

    def to_json(self) -> str:
        """One line of JSON (confidences to 7 significant digits, the precision of float32)."""
        body = asdict(self)
        for key in ("confidence", "entropy", "margin"):
            if body[key] is not None:
                body[key] = [float(f"{c:.7g}") for c in body[key]]
        # allow_nan=False: NaN and Infinity are not JSON, and a reader would choke on them later.
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def foreign_token(self) -> int | None:
        """The first token id outside the vocabulary of the tokenizer the record names ([MASK], padding), or None.

        The sampler never draws such ids; one in a record means its numbers went wrong, and every reader would refuse
        it later, so writers check it before anything is written.
        """
        size = self.tokenizer.get("vocab_size") if isinstance(self.tokenizer, dict) else None
        if not isinstance(size, int) or isinstance(size, bool):
            return None
        return next((t for t in self.tokens if not 0 <= t < size), None)

    @property
    def generated(self) -> list[int]:
        """Token ids after the prompt."""
        return self.tokens[self.prompt_len :]

    def terminating_eos(self, eos_id: int | None) -> int | None:
        """The position of the generated EOS that ends a variable-length draft, or None.

        A draft stage with `var_length` keeps the EOS it stopped at as its last token; refinement never remasks it,
        so the record still ends where its draft stopped (and where its `text` says).
        """
        draft = self.stages[0] if self.stages else {}
        last = len(self.tokens) - 1
        if eos_id is None or draft.get("kind") != "draft" or not draft.get("var_length"):
            return None
        return last if last >= self.prompt_len and self.tokens[last] == eos_id else None


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity, which are not JSON; a record holding them is corrupt.
    raise ValueError(f"{name} is not valid JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    # An int is finite however long (math.isfinite would overflow converting a 401-digit one to float).
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


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
    _check_measures(body, where, len(tokens))
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


def _check_measures(body: dict[str, Any], where: str, length: int) -> None:
    """The snapshot entropies (nats, >= 0) and margins (in [0, 1]), when a record has them."""
    for key, high in (("entropy", math.inf), ("margin", 1.0)):
        values = body.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != length:
            raise InputError(f"{where}: {key} must be a list as long as tokens ({length}) or null")
        if not all(_is_number(v) and 0.0 <= v <= high for v in values):
            raise InputError(f"{where}: {key} must hold finite numbers in [0, {high:g}]")


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


def read_records(source: str | Path) -> Iterator[Record]:
    """Records from a JSONL file, or from stdin when `source` is "-"; blank lines are skipped.

    Raises:
        InputError: a malformed line (naming its number), a file that is not UTF-8 or cannot be read, or an input
            with no record at all.
    """
    name = "stdin" if str(source) == "-" else str(source)
    stream = open_input(source, "a JSONL file")
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

"""Errors that reach users.

Library code raises a `DidError` subclass whose message is one sentence a user can act on. The CLI's top-level
handler prints that sentence on one line and exits with the error's `exit_code`; `DID_DEBUG=1` shows the traceback.
"""

from __future__ import annotations


class DidError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code: int = 1


class UsageError(DidError):
    """Bad arguments or settings (a gamma outside [0, 1], a block size that does not divide the length)."""

    exit_code = 2


class InputError(DidError):
    """Malformed input files: a truncated JSONL line, an empty input, a record for another model."""

    exit_code = 2


class ModelLoadError(DidError):
    """A model, tokenizer or checkpoint could not be found or does not match what it claims to be."""

    exit_code = 2


class DataError(DidError):
    """Training or evaluation data is missing, empty or unreadable."""

    exit_code = 2


class SamplingError(DidError):
    """A sample could not be drawn, e.g. it stayed degenerate (low entropy) in every allowed try."""

    exit_code = 3


class TrainingDivergedError(DidError):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    exit_code = 3


class OutputError(DidError):
    """An output cannot be written: a directory or read-only path, a full disk, a closed stdout, a busy file."""

    exit_code = 1


class HubError(DidError):
    """The Hugging Face Hub cannot take an upload: no token, offline or unreachable, refused, or failed midway."""

    exit_code = 1

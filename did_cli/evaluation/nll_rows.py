"""The rows `did eval-nll` scores: documents from local files, the Hub or a zero-shot preset, tokenised into rows.

Layouts (what a row holds; position 0 and padding are never scored):

* `wrap`: documents + EOS joined and cut into L-token rows, exactly as training wraps its data (`data.py`).
* `bos-eos`: BD3-LM's zero-shot rows (`wrap: True`, `insert_valid_eos=False`): documents joined without EOS, each row
  [BOS] + L - 2 tokens + [EOS].
* `document`: one row per document (BD3-LM's `wrap: False`): [BOS] + document + [EOS] truncated to L and padded with
  the [MASK] id (BD3-LM pads GPT-2 rows with an added [PAD] token whose id is the mask id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from did_cli.checkpoints import bos_token_id
from did_cli.data import DataSpec, load_documents
from did_cli.errors import DataError, UsageError
from did_cli.evaluation.zero_shot import get_preset
from did_cli.model import BD3LM

LAYOUTS = ("wrap", "bos-eos", "document")


@dataclass(frozen=True)
class EvalRows:
    """The rows to score.

    Attributes:
        tokens: [N, L] int64 x_0.
        scored: [N, L] bool, the positions that count (never position 0, never padding).
        info: where the rows came from: source, layout, documents read, fingerprint.
    """

    tokens: torch.Tensor
    scored: torch.Tensor
    info: dict[str, Any]


def read_documents(
    data: str | None,
    preset: str | None,
    *,
    config: str | None = None,
    split: str = "test",
    text_field: str = "text",
    txt_documents: str = "lines",
) -> tuple[list[str], dict[str, Any]]:
    """The documents of a local file, a Hub dataset or a preset (detokenised), with a description of the source.

    Raises:
        UsageError: neither or both of `data` and `preset`, or an unknown preset.
        DataError: missing, unreadable or empty data.
    """
    if (data is None) == (preset is None):
        raise UsageError("give exactly one of --data and --preset")
    if preset is not None:
        chosen = get_preset(preset)
        spec = DataSpec(chosen.dataset, chosen.config, chosen.split, chosen.text_field, val_fraction=0.0)
        texts = list(load_documents(spec)["text"])
        if chosen.detokenize is not None:
            texts = [chosen.detokenize(text) for text in texts]
        return texts, {"preset": preset, **asdict(spec)}
    spec = DataSpec(data, config, split, text_field, txt_documents, val_fraction=0.0)
    return list(load_documents(spec)["text"]), asdict(spec)


def build_rows(
    documents: Iterable[str], tokenizer: Any, length: int, layout: str, mask_id: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokenise documents (no special tokens) into rows of `length` in one of the `LAYOUTS`.

    Args:
        documents: texts in order.
        tokenizer: the model's tokenizer (EOS required; BOS falls back to EOS as in did's sampler).
        length: L.
        layout: `wrap`, `bos-eos` or `document` (see the module docstring).
        mask_id: the [MASK] id, used as padding in the `document` layout.
        limit: stop after this many rows.

    Returns:
        tokens [N, L] int64, scored [N, L] bool and the number of documents read.
    """
    if layout not in LAYOUTS:
        raise UsageError(f"row layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    eos, bos = tokenizer.eos_token_id, bos_token_id(tokenizer)
    if eos is None or bos is None:
        raise DataError("the tokenizer has no EOS token to end documents with")
    rows: list[list[int]] = []
    stream: list[int] = []
    width = length if layout == "wrap" else length - 2
    documents = iter(documents)
    read = 0
    while limit is None or len(rows) < limit:
        chunk = [text for _, text in zip(range(256), documents, strict=False)]
        if not chunk:
            break
        read += len(chunk)
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            if layout == "document":
                rows.append([bos, *ids[:width], eos])
                continue
            stream.extend([*ids, eos] if layout == "wrap" else ids)
            while len(stream) >= width:
                piece, stream = stream[:width], stream[width:]
                rows.append(piece if layout == "wrap" else [bos, *piece, eos])
    rows = rows[:limit] if limit is not None else rows
    tokens = torch.full((len(rows), length), mask_id, dtype=torch.int64)
    scored = torch.zeros((len(rows), length), dtype=torch.bool)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row)
        scored[index, 1 : len(row)] = True
    return tokens, scored, read


def load_rows(
    documents: Sequence[str],
    tokenizer: Any,
    model: BD3LM,
    *,
    source: dict[str, Any],
    seq_len: int | None = None,
    layout: str = "wrap",
    num_samples: int | None = None,
) -> EvalRows:
    """The rows one model is scored on.

    Raises:
        UsageError: a sequence length above the model's length (or below 2).
        DataError: not enough text for one row.
    """
    length = seq_len or model.config.model_length
    if length > model.config.model_length:
        raise UsageError(f"--seq-len {length} exceeds the model's length {model.config.model_length}")
    if length < 3:
        raise UsageError(f"--seq-len must be at least 3, got {length}")
    if num_samples is not None and num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1, got {num_samples}")
    tokens, scored, read = build_rows(documents, tokenizer, length, layout, model.mask_id, num_samples)
    if tokens.shape[0] == 0:
        raise DataError(f"the data holds fewer tokens than one row of {length}; lower --seq-len or add text")
    info = {
        "source": source,
        "layout": layout,
        "seq_len": length,
        "documents_read": read,
        "rows": tokens.shape[0],
        "fingerprint": fingerprint(tokens, scored),
    }
    return EvalRows(tokens, scored, info)


def fingerprint(tokens: torch.Tensor, scored: torch.Tensor) -> str:
    """A short hash of exactly what is scored (token ids and scored positions)."""
    digest = hashlib.sha256(np.ascontiguousarray(tokens.numpy()).tobytes())
    digest.update(np.packbits(scored.numpy()).tobytes())
    return digest.hexdigest()[:16]

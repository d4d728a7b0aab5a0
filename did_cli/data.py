"""Training data: load text (Hub dataset or local files), tokenise once, wrap into fixed-length rows, cache on disk.

Documents are tokenised without special tokens and followed by EOS, then the whole stream is cut into rows of the
sequence length (BD3-LM's "wrap"; no padding, so the [MASK] id can never collide with a pad id). The token stream is
written once to a flat binary file per split and memory-mapped afterwards, so corpora larger than RAM work and later
runs reuse the cache. Row order is a fixed function of (seed, epoch), so a resumed run sees exactly the rows it
would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from did_cli.errors import DataError
from did_cli.files import atomic_folder

_FORMAT_VERSION = 1
_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataSpec:
    """Where training text comes from.

    Attributes:
        source: a Hugging Face dataset id (e.g. `openwebtext`) or a local file/folder of .txt, .jsonl or .parquet.
        config: dataset configuration name (Hub datasets only).
        split: dataset split to read (Hub datasets only; local files are one split).
        text_field: column holding the text (.jsonl, .parquet and Hub datasets).
        txt_documents: for .txt files, `lines` (one document per non-empty line) or `file` (one per file).
        val_fraction: share of documents held out for validation (taken from the end, as BD3-LM does).
    """

    source: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    txt_documents: str = "lines"
    val_fraction: float = 0.01


@dataclass(frozen=True)
class TokenizedCorpus:
    """Memory-mapped token streams of the train and validation splits."""

    train: np.ndarray
    valid: np.ndarray
    folder: Path
    meta: dict[str, Any]


def _check_local_text(builder: str, files: list[str]) -> None:
    """Text and JSON lines files read whole once before `datasets` sees them.

    `datasets` reports a non-UTF-8, empty or malformed file with a logged pyarrow message and a vague error; here it is
    one line naming the file (and the line).

    Raises:
        DataError: a file that is not UTF-8, holds no text, or (JSON lines) has a line that is not a JSON object.
    """
    if builder not in ("text", "json"):
        return
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{name} is not UTF-8 text") from None
        if not text.strip():
            raise DataError(f"{name} holds no text")
        if builder != "json" or name.endswith(".json"):
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                body = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(body, dict):
                raise DataError(f"{name} line {number}: expected a JSON object with a text field")


def _local_files(path: Path) -> dict[str, list[str]]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    by_builder: dict[str, list[str]] = {}
    for file in files:
        builder = _SUFFIXES.get(file.suffix.lower())
        if builder:
            by_builder.setdefault(builder, []).append(str(file.resolve()))
    if not by_builder:
        raise DataError(f"{path} holds no .txt, .jsonl or .parquet file")
    if len(by_builder) > 1:
        raise DataError(f"{path} mixes file types ({', '.join(sorted(by_builder))}); use one kind per run")
    return by_builder


def looks_like_path(source: str) -> bool:
    """Whether a `--data` value is meant as a local path rather than a Hub dataset id (`name` or `org/name`).

    Path-like: starts with `.`, `/` or `~`, has a backslash or more than one `/`, or ends in a data file suffix.
    """
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).suffix.lower() in _SUFFIXES
    )


def check_data_source(source: str, flag: str = "--data") -> None:
    """Refuse, before any work, a path-like data source that does not exist or is neither a file nor a folder.

    Raises:
        DataError: naming `flag` and the path.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not (path.is_file() or path.is_dir()):
            raise DataError(f"{flag} {source} is neither a file nor a folder")
    elif looks_like_path(source):
        raise DataError(f"file not found: {flag} {source} does not exist")


def load_documents(spec: DataSpec, cache_dir: Path | None = None) -> Any:
    """A `datasets.Dataset` with one document per row in column `text`.

    Args:
        spec: where the text comes from.
        cache_dir: a private `datasets` cache for local files. `datasets` keys its cache of local files by path and
            modification time, so a corpus replaced by other text of the same size and mtime would come back stale
            from the shared cache; `tokenize_corpus` passes a fresh folder. Hub datasets always use the shared cache.
    """
    import datasets

    datasets.disable_progress_bars()  # did reports its own progress; datasets' bars would flood stderr
    # Retry warnings from the Hub client (one per attempt when offline) would bury the one-line error below.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()

    check_data_source(spec.source)
    path = Path(spec.source).expanduser()
    field = spec.text_field
    offline: str | None = None
    try:
        if path.exists():
            builder, files = next(iter(_local_files(path).items()))
            _check_local_text(builder, files)
            kwargs: dict[str, Any] = {}
            if builder == "text":
                field = "text"
                kwargs["sample_by"] = "document" if spec.txt_documents == "file" else "line"
            cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
            dataset = datasets.load_dataset(builder, data_files=files, split="train", **kwargs, **cache)
        else:
            from did_cli.checkpoints import hub_unreachable

            offline = hub_unreachable()
            with _datasets_offline(offline is not None):
                dataset = datasets.load_dataset(spec.source, spec.config, split=spec.split)
    except DataError:
        raise
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as exc:
        why = f"not cached and {offline}" if offline else f"{_first_line(exc)}; offline and not cached?"
        raise DataError(
            f"cannot load dataset {spec.source!r} ({why}); pass --data PATH to local .txt, .jsonl or .parquet files"
        ) from None
    except Exception as exc:  # datasets raises many types (DatasetNotFoundError, builder errors) for a bad source
        raise DataError(f"cannot load dataset {spec.source!r}: {_first_line(exc)}") from None
    if field not in dataset.column_names:
        raise DataError(f"{spec.source} has no column {field!r} (columns: {', '.join(dataset.column_names)})")
    if field != "text":
        dataset = dataset.rename_column(field, "text")
    dataset = dataset.select_columns(["text"]).filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(dataset) == 0:
        raise DataError(f"{spec.source} holds no text")
    return dataset


@contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """Put `datasets` in offline mode for one call when the Hub cannot be reached.

    Against an unreachable Hub `datasets` retries for ~30 s; offline it answers from its cache at once. Its flag is a
    module global read at call time, so it is set here and restored afterwards.
    """
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _content_sha256(file: str) -> str:
    with open(file, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fingerprint(spec: DataSpec, tokenizer: Any) -> str:
    """The cache key: data spec, each local file's content hash, and the tokenizer's vocabulary.

    Files are keyed by content, not by size and mtime: a corpus replaced by other text of the same size within the
    same second must not reuse the old tokens. Hashing reads the file once, far cheaper than tokenising it.
    """
    path = Path(spec.source).expanduser()
    files = []
    if path.exists():
        for file in next(iter(_local_files(path).values())):
            files.append((file, _content_sha256(file)))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    body = {
        "format": _FORMAT_VERSION,
        "spec": asdict(spec),
        "files": files,
        "tokenizer": hashlib.sha256(vocabulary.encode()).hexdigest(),
        "eos": tokenizer.eos_token_id,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """`$DID_CACHE` or `~/.cache/did`, where tokenised corpora are kept."""
    return Path(os.environ.get("DID_CACHE", Path.home() / ".cache" / "did")) / "data"


def tokenize_corpus(
    spec: DataSpec, tokenizer: Any, cache_dir: Path | None = None, num_proc: int | None = None
) -> TokenizedCorpus:
    """Tokenise once and cache: later calls with the same data and tokenizer only memory-map the files."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents with")
    folder = (cache_dir or default_cache_dir()) / _fingerprint(spec, tokenizer)
    if not (folder / "meta.json").exists():
        _build_cache(spec, tokenizer, folder, num_proc)
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r") if meta["train_tokens"] else np.zeros(0, dtype)
    valid = np.memmap(folder / "valid.bin", dtype=dtype, mode="r") if meta["valid_tokens"] else np.zeros(0, dtype)
    # What the run records (settings.json) about its data: the cache key is a digest of the data and tokenizer, and
    # whether the source was a Hub dataset rather than local files (the model card's `datasets`).
    meta = {**meta, "fingerprint": folder.name, "hub": not Path(spec.source).expanduser().exists()}
    return TokenizedCorpus(train, valid, folder, meta)


def _build_cache(spec: DataSpec, tokenizer: Any, folder: Path, num_proc: int | None) -> None:
    import datasets

    eos = tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.uint32

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [row + [eos] for row in ids]}

    with atomic_folder(folder) as staging:
        documents = load_documents(spec, staging / "datasets")
        # The intermediate Arrow table lives in the staging folder (deleted below) with the final integer width,
        # instead of an int64 copy of the whole tokenised corpus left in the datasets cache.
        features = datasets.Features({"ids": datasets.Sequence(datasets.Value(np.dtype(dtype).name))})
        encoded = documents.map(
            encode,
            batched=True,
            remove_columns=["text"],
            num_proc=num_proc,
            features=features,
            cache_file_name=str(staging / "tokenized.arrow"),
            desc="tokenizing",
        )
        count = len(encoded)
        held_out = max(1, round(count * spec.val_fraction)) if count > 1 and spec.val_fraction > 0 else 0
        sizes = {}
        for split, rows in (("train", range(count - held_out)), ("valid", range(count - held_out, count))):
            total = 0
            with open(staging / f"{split}.bin", "wb") as handle:
                for start in range(rows.start, rows.stop, 10_000):
                    chunk = encoded[start : min(start + 10_000, rows.stop)]["ids"]
                    flat = np.fromiter((t for doc in chunk for t in doc), dtype=dtype)
                    flat.tofile(handle)
                    total += flat.size
            sizes[split] = total
        meta = {
            "format": _FORMAT_VERSION,
            "spec": asdict(spec),
            "documents": count,
            "valid_documents": held_out,
            "train_tokens": sizes["train"],
            "valid_tokens": sizes["valid"],
            "dtype": np.dtype(dtype).name,
            "tokenizer": getattr(tokenizer, "name_or_path", None),
            "vocab_size": len(tokenizer),
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        del encoded, documents
        for arrow in staging.glob("tokenized*.arrow"):
            arrow.unlink()
        shutil.rmtree(staging / "datasets", ignore_errors=True)


class PackedRows:
    """A flat token stream seen as rows of `length` tokens (the remainder is dropped), in a seeded order per epoch."""

    def __init__(self, tokens: np.ndarray, length: int, seed: int) -> None:
        self.tokens, self.length, self.seed = tokens, length, seed
        self.num_rows = tokens.size // length
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            digest = hashlib.sha256(f"did-rows:{self.seed}:{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            self._orders = {epoch: torch.randperm(self.num_rows, generator=generator)}
        return self._orders[epoch]

    def row(self, index: int) -> np.ndarray:
        """Row `index` in storage order."""
        return np.asarray(self.tokens[index * self.length : (index + 1) * self.length], dtype=np.int64)

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Rows `first .. first+count-1` of the endless shuffled stream (epoch after epoch).

        Returns:
            [count, length] int64.
        """
        rows = []
        for sample in range(first, first + count):
            epoch, position = divmod(sample, self.num_rows)
            rows.append(self.row(int(self._order(epoch)[position])))
        return torch.from_numpy(np.stack(rows))

    def sequential(self, first: int, count: int) -> torch.Tensor:
        """Rows in storage order (validation reads the same rows every time)."""
        return torch.from_numpy(np.stack([self.row(i) for i in range(first, min(first + count, self.num_rows))]))

"""Training checkpoints that load without pickle, with a manifest that tells an intact checkpoint from a damaged one.

A checkpoint folder `step_NNNNNNNN/` holds:

* `model.safetensors`: the trained module's weights (keys `denoiser.*`).
* `optimizer.safetensors`: the optimizer's per-parameter tensors (`<param index>.<name>`); its hyper-parameters
  and non-tensor values go to `training_state.json`.
* `ema.safetensors`: the EMA shadow weights, keyed by parameter name.
* `rng_<rank>.safetensors`: each process's torch (and CUDA) generator states as tensors; Python's and NumPy's
  generator states as integer tensors plus string metadata.
* `training_state.json`: step, scheduler position, EMA update count, gradient-scaler state, the settings the run
  used and any settings changes allowed on resume.
* `manifest.json`: size and sha256 of every other file, written last.

Why not accelerate's `save_state`/`load_state`: they store the optimizer, scheduler and RNG states with
`torch.save`, load registered objects (our EMA and scheduler) with `weights_only=False` (a crafted checkpoint runs
code), and swallow a damaged RNG file, resuming silently with other random streams. Everything here is read with
`safetensors` or `json`, which cannot run code, and the manifest is checked before anything is loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from did_cli.errors import ModelLoadError
from did_cli.files import write_text_atomically

MANIFEST = "manifest.json"
STATE = "training_state.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
EMA_WEIGHTS = "ema.safetensors"
FORMAT = 1


def rng_file(rank: int) -> str:
    """The file holding process `rank`'s generator states."""
    return f"rng_{rank}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record size and sha256 of every file in `folder` (except the manifest) in `folder/manifest.json`, atomically."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_text_atomically(folder / MANIFEST, json.dumps({"format": FORMAT, "files": entries}, indent=1) + "\n")


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is intact.

    Intact: the manifest is readable, lists the required files, and every listed file has its size and sha256.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        entries = manifest["files"]
        if not isinstance(entries, dict):
            raise TypeError("files is not a mapping")
    except FileNotFoundError:
        return "it has no manifest.json (unfinished, or written by a did older than this one)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest.json is unreadable ({exc})"
    for required in (STATE, MODEL, OPTIMIZER, EMA_WEIGHTS, rng_file(0)):
        if required not in entries:
            return f"its manifest lists no {required}"
    for name, entry in entries.items():
        path = folder / name
        try:
            if path.stat().st_size != entry.get("size"):
                return f"{name} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}"
            if _sha256(path) != entry.get("sha256"):
                return f"{name} does not match its sha256 in the manifest"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} is unreadable ({exc.strerror or exc})"
    return None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to the CPU, made contiguous) as safetensors.

    Raises:
        OSError: the file could not be written, with `filename` set (safetensors' own error on a full disk says only
            "Error while serializing: I/O error", naming no file).
    """
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    except SafetensorError as exc:
        raise OSError(errno.EIO, str(exc).strip() or "I/O error", str(path)) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file on the CPU (never unpickles)."""
    return load_file(str(path), device="cpu")


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer `state_dict()` as (tensors for safetensors, JSON-ready rest).

    Tensors are keyed `<param index>.<state name>`; non-tensor per-parameter values and the param groups go to the
    JSON part. Hyper-parameters must be plain numbers, booleans, None or sequences of them.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng() -> dict[str, Any]:
    """This process's generator states (torch CPU and CUDA, Python's `random`, NumPy's global generator)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def save_rng(path: Path, snapshot: dict[str, Any]) -> None:
    """Write a `capture_rng()` snapshot as safetensors (integer tensors plus string metadata)."""
    version, words, gauss = snapshot["python"]
    kind, keys, position, has_gauss, cached = snapshot["numpy"]
    tensors = {
        "torch": snapshot["torch"],
        "python": torch.tensor(words, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
    }
    tensors.update({f"cuda.{i}": state for i, state in enumerate(snapshot["cuda"])})
    metadata = {
        "python": json.dumps([version, gauss]),
        "numpy": json.dumps([kind, int(position), int(has_gauss), float(cached)]),
    }
    save_tensors(path, tensors, metadata)


def restore_rng(path: Path) -> None:
    """Set this process's generators from a `save_rng` file."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    version, gauss = json.loads(metadata["python"])
    kind, position, has_gauss, cached = json.loads(metadata["numpy"])
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    random.setstate((version, tuple(int(w) for w in tensors["python"].tolist()), gauss))
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))


def read_state(folder: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (`training_state.json`), checked for a step and settings."""
    try:
        saved = json.loads((folder / STATE).read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or not isinstance(saved.get("step"), int) or "settings" not in saved:
            raise ValueError("no step or settings")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder / STATE} is unreadable: {exc}") from None
    return saved


def newest_intact(existing: list[tuple[int, Path]]) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest intact checkpoint of `existing` (sorted by step) and the damaged newer ones with their problem.

    Raises:
        ModelLoadError: none is intact.
    """
    damaged: list[tuple[Path, str]] = []
    for _, folder in reversed(existing):
        problem = damage(folder)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    folder, problem = damaged[0]
    raise ModelLoadError(f"no intact checkpoint to resume from in {folder.parent}: {folder.name}: {problem}")

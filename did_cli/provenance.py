"""What produced an output: package versions, the model and tokenizer, the device, so every file is reproducible."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of did and of the libraries whose behaviour changes its numbers."""
    return {
        "did": package_version("did"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
    }


def model_info(model: Any) -> dict[str, Any]:
    """Name, weights hash and revision of a loaded model (see checkpoints.ModelSource).

    A model loaded from a local folder also gets `path`, the folder's absolute path, so a record still names a
    loadable model when it is read from another working directory (embedded names and Hub ids resolve anywhere).
    """
    source = getattr(model, "source", None)
    if source is None:
        return {"name": "<in-memory>", "sha256": None, "revision": None}
    info = {"name": source.name, "sha256": source.sha256, "revision": source.revision}
    folder = local_folder(source.name)
    if folder is not None:
        info["path"] = folder
    return info


def local_folder(name: str) -> str | None:
    """The absolute path of `name` when it is a local folder (not an embedded model name), else None."""
    from did_cli.checkpoints import EMBEDDED

    if not name or name in EMBEDDED or name.startswith("<"):
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else None


def record_model(record: Any) -> str | None:
    """The model that made a record's latest stage, as a name `load_model` accepts from any working directory."""
    stages = getattr(record, "stages", None) or []
    info = (stages[-1].get("model") if stages else None) or getattr(record, "model", None) or {}
    path, name = info.get("path"), info.get("name")
    if path and Path(path).is_dir():
        return str(path)
    if name and not str(name).startswith("<"):
        return str(name)
    return None


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Name and size of a tokenizer: enough to refuse records made with another vocabulary.

    A tokenizer that ships with an embedded model is named by that model's name, not by the folder it was installed
    to, so records stay comparable across installations.
    """
    from did_cli.checkpoints import EMBEDDED, tokenizer_source

    source = tokenizer_source(tokenizer)
    name = source.name
    for embedded, folder in EMBEDDED.items():
        if name == str(folder):
            name = embedded
    info = {"name": local_folder(name) or name, "vocab_size": len(tokenizer)}
    if source.path is not None and name not in EMBEDDED:
        info["path"] = str(Path(source.path).resolve())  # the folder actually read
    return info


def device_info(device: Any) -> str:
    """A readable device name (the GPU model on CUDA), for a `torch.device`."""
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type

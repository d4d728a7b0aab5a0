"""Model and tokenizer files: resolving names, strict loading of BD3-LM weights, and saving did checkpoints.

A checkpoint is a folder with `config.json` (BD3-LM's fields), `model.safetensors` (BD3-LM's key names) and,
for did's own checkpoints, the tokenizer files. Released BD3-LM repositories carry no tokenizer: they use GPT-2's
(`gpt2`) with the [MASK] id one past its vocabulary (50257).

Loading is strict on purpose: BD3-LM's own loader uses `strict=False`, which silently leaves weights random and
is a known source of garbled samples. Here a missing, unexpected or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from did_cli.config import ModelConfig
from did_cli.errors import ModelLoadError, UsageError
from did_cli.files import atomic_folder
from did_cli.model import BD3LM

ASSETS = Path(__file__).parent / "assets"
# Models that ship inside the package, so a first run needs no network.
EMBEDDED = {"did-tiny": ASSETS / "did-tiny", "did-tiny-judge": ASSETS / "did-tiny-judge"}
DEFAULT_MODEL = "did-tiny"
# BD3-LM checkpoints on the Hub carry no tokenizer files; their tokenizer is GPT-2's.
BD3LM_TOKENIZER = "gpt2"
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, for provenance: the name asked for, the folder read and the weights' hash."""

    name: str
    path: str
    sha256: str
    revision: str | None = None


def resolve(name_or_path: str, revision: str | None = None, *, what: str = "model") -> Path:
    """A local folder for an embedded name, a folder path, or a Hugging Face Hub id (downloaded or cached).

    Hub access goes through `huggingface_hub`, so its cache, `revision` pinning and `HF_HUB_OFFLINE` apply.
    """
    if name_or_path in EMBEDDED:
        folder = EMBEDDED[name_or_path]
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"the embedded {what} {name_or_path!r} is not part of this installation")
        return folder
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{what} path {name_or_path} is a file; pass the folder that holds config.json")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"{what} folder {name_or_path} does not exist")
    return _download(name_or_path, revision, what)


def _download(repo_id: str, revision: str | None, what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ["config.json", "*.safetensors", *_TOKENIZER_FILES]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline?); download it once online or pass a local folder"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelLoadError(f"{what} {repo_id!r} was not found on the Hugging Face Hub (or is private)") from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"revision {revision!r} of {repo_id!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not fetch {what} {repo_id!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def file_sha256(path: Path) -> str:
    """Content hash of a weights file; Hub cache blobs of LFS files are already named by it, so reuse that."""
    real = Path(os.path.realpath(path))
    if len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder} has no config.json; is it a BD3-LM or did checkpoint?")
    try:
        body = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return ModelConfig.from_json_dict(body)


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, failing on any missing, unexpected or mis-shaped tensor (naming it)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ModelLoadError(f"{source} lacks weight {missing[0]}" + _more(missing))
    if unexpected:
        raise ModelLoadError(f"{source} has unexpected weight {unexpected[0]}" + _more(unexpected))
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ModelLoadError(
                f"{source}: weight {key} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def pick_device(device: str | torch.device | None) -> torch.device:
    """`auto`/None → CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA device is available")
    return device


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """fp32 unless asked otherwise: BD3-LM's reference sampler runs in fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
    return names[dtype]


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    revision: str | None = None,
) -> BD3LM:
    """Load a BD3-LM or did checkpoint by embedded name, folder or Hub id.

    Args:
        name_or_path: `did-tiny`, a checkpoint folder, or a Hub id such as `kuleshov-group/bd3lm-owt-block_size4`.
        device: `auto` (default), `cpu`, `cuda`, or a torch device.
        dtype: weights dtype; float32 by default.
        revision: Hub revision (branch, tag or commit) to pin.

    Returns:
        The model in eval mode, with `model.source` (a ModelSource) describing what was loaded.
    """
    folder = resolve(name_or_path, revision)
    config = read_config(folder)
    weights = folder / _WEIGHTS
    if not weights.exists():
        raise ModelLoadError(f"{folder} has no {_WEIGHTS}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise ModelLoadError(f"could not read {weights}: {_first_line(exc)}") from None
    with torch.device("meta"):
        model = BD3LM(config)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, {k: v.float() for k, v in state.items()}, str(weights))
    model = model.to(device=pick_device(device), dtype=parse_dtype(dtype)).eval()
    model.source = ModelSource(name_or_path, str(folder), file_sha256(weights), revision)
    return model


def save_model(model: BD3LM, folder: str | Path, tokenizer: Any = None, *, dtype: torch.dtype | None = None) -> Path:
    """Write a did checkpoint folder atomically (a temporary folder renamed into place).

    Args:
        model: the model to save (its weights in their dtype unless `dtype` is given).
        folder: destination; replaced if it exists.
        tokenizer: a transformers tokenizer to save beside the weights, so the folder is self-contained.
        dtype: optional dtype for the stored weights (e.g. bfloat16 to halve the file).
    """
    folder = Path(folder)
    with atomic_folder(folder) as staging:
        parameters = {name for name, _ in model.named_parameters()}
        # Only parameters take the storage dtype: buffers (rotary frequencies, eps metadata) stay exact.
        state = {
            k: (v.to(dtype) if dtype is not None and k in parameters else v).detach().cpu().contiguous()
            for k, v in model.state_dict().items()
        }
        save_file(state, str(staging / _WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        (staging / "config.json").write_text(json.dumps(model.config.to_json_dict(), indent=2) + "\n")
    return folder


def has_tokenizer_files(folder: Path) -> bool:
    """Whether a checkpoint folder ships its own tokenizer."""
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


def load_tokenizer(model: BD3LM | str, override: str | None = None) -> Any:
    """The tokenizer for a model: `override`, else the checkpoint's own files, else its config's, else GPT-2's.

    The tokenizer must leave the model's [MASK] id unused: BD3-LM's own helper adds a '[PAD]' token at id 50257,
    the mask id, which corrupts any padded input; that is refused here.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if override is not None:
        name = override
    elif isinstance(model, BD3LM) and has_tokenizer_files(Path(model.source.path)):
        name = model.source.path
    elif isinstance(model, str):
        name = model
    else:
        name = model.config.tokenizer or BD3LM_TOKENIZER
    folder = resolve(name, what="tokenizer") if name in EMBEDDED or Path(name).expanduser().exists() else None
    if folder is not None and not has_tokenizer_files(folder) and (folder / "config.json").exists():
        # A checkpoint folder without tokenizer files (released BD3-LM checkpoints ship none): use the tokenizer
        # its config names, else GPT-2's.
        return load_tokenizer(read_config(folder).tokenizer or BD3LM_TOKENIZER)
    try:
        if folder is not None and (folder / "tokenizer.json").exists():
            # Loading through AutoTokenizer would read the folder's config.json (model_type bd3lm, unknown to
            # transformers) and warn; a tokenizer.json is all a fast tokenizer needs.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder else name)
    except OSError as exc:
        if "offline" in str(exc).lower() or "cannot find the requested files" in str(exc).lower():
            raise ModelLoadError(
                f"tokenizer {name!r} is not cached and the Hub cannot be reached (offline?); pass --tokenizer FOLDER"
            ) from None
        raise ModelLoadError(f"could not load tokenizer {name!r}: {_first_line(exc)}") from None
    if isinstance(model, BD3LM):
        check_tokenizer(tokenizer, model.config, name)
    return tokenizer


def check_tokenizer(tokenizer: Any, config: ModelConfig, name: str = "tokenizer") -> None:
    """Refuse a tokenizer whose ids reach the model's [MASK] id or run past its vocabulary."""
    size = len(tokenizer)
    if size > config.vocab_size:
        raise ModelLoadError(f"{name} has {size} tokens but the model's vocabulary is {config.vocab_size}")
    if config.mask_id < size:
        raise ModelLoadError(f"{name} uses id {config.mask_id}, which the model reserves for [MASK]")
    if bos_token_id(tokenizer) is None:
        raise ModelLoadError(f"{name} has neither a BOS nor an EOS token to start unconditional samples with")


def bos_token_id(tokenizer: Any) -> int | None:
    """The id that starts a sample: BOS, or EOS for GPT-2-style tokenizers where they are the same token."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

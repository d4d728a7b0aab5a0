"""Model and tokenizer files: resolving names, strict loading of BD3-LM weights, and saving did checkpoints.

A checkpoint is a folder with `config.json` (BD3-LM's fields), `model.safetensors` (BD3-LM's key names) and,
for did's own checkpoints, the tokenizer files and a README.md model card. did never runs the code a config.json's
`auto_map` names: that is for transformers users. Released BD3-LM repositories carry no tokenizer: they use GPT-2's
(`gpt2`) with the [MASK] id one past its vocabulary (50257).

Loading is strict on purpose: BD3-LM's own loader uses `strict=False`, which silently leaves weights random and
is a known source of garbled samples. Here a missing, unexpected, mis-shaped or non-finite tensor is an error naming
it. Strictness follows the config: the `sampling_eps_min/max` metadata buffers exist only when `var_min` is true.

Tokenizers: a config.json is data, so the tokenizer folder it names is resolved inside the checkpoint folder and
never elsewhere; only the user's own `--tokenizer` may point anywhere. Each loaded tokenizer carries a
`TokenizerSource` (`tokenizer_source`) saying what was loaded, and saving records its portable name in config.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from did_cli.config import ModelConfig
from did_cli.errors import InputError, ModelLoadError, UsageError
from did_cli.files import atomic_folder
from did_cli.kv_cache import check_kv_cache_dtype
from did_cli.model import BD3LM
from did_cli.model_card import render_card
from did_cli.settings import check_device_name, dtype_name

ASSETS = Path(__file__).parent / "assets"
# Models that ship inside the package, so a first run needs no network.
EMBEDDED = {"did-tiny": ASSETS / "did-tiny", "did-tiny-judge": ASSETS / "did-tiny-judge"}
DEFAULT_MODEL = "did-tiny"
# BD3-LM checkpoints on the Hub carry no tokenizer files; their tokenizer is GPT-2's.
BD3LM_TOKENIZER = "gpt2"
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"]
_WEIGHTS = "model.safetensors"
_VAR_MIN_BUFFERS = ("sampling_eps_min", "sampling_eps_max")


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
    if revision is not None and (name_or_path in EMBEDDED or Path(name_or_path).expanduser().exists()):
        # A revision names a commit of a Hub repository; recorded beside a local or embedded model it would claim a
        # pin that never happened.
        kind = "an embedded model" if name_or_path in EMBEDDED else "a local folder"
        raise UsageError(f"--revision {revision} applies to Hub ids; {what} {name_or_path!r} is {kind}")
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
        # Without a reachable Hub only the cache is asked: huggingface_hub would otherwise retry for ~50 s.
        local_only = hub_unreachable() is not None
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=local_only))
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
        # parse_constant: Python's json accepts NaN and Infinity, which are not JSON.
        body = json.loads(config_path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"{config_path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {config_path}: {_first_line(exc)}") from None
    try:
        return ModelConfig.from_json_dict(body)
    except InputError as exc:
        raise InputError(f"{config_path}: {exc}") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`, failing on any missing, unexpected or mis-shaped tensor (naming it)."""
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)


def check_state_dict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Fail on any missing, unexpected or mis-shaped tensor of `state` (naming it); `expected` may be on meta."""
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


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: such a model samples garbage or NaN JSON."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelLoadError(f"{source}: weight {key} holds NaN or infinite values")


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def pick_device(device: str | torch.device | None) -> torch.device:
    """`auto`/None → CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):
        check_device_name(device)
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
    return getattr(torch, dtype_name(dtype))


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    revision: str | None = None,
    kv_cache_dtype: str | torch.dtype | None = None,
) -> BD3LM:
    """Load a BD3-LM or did checkpoint by embedded name, folder or Hub id.

    Args:
        name_or_path: `did-tiny`, a checkpoint folder, or a Hub id such as `kuleshov-group/bd3lm-owt-block_size4`.
        device: `auto` (default), `cpu`, `cuda`, or a torch device.
        dtype: weights dtype; float32 by default.
        revision: Hub revision (branch, tag or commit) to pin.
        kv_cache_dtype: dtype of the sampler's KV cache: None (the weights'), float32, or bfloat16 (with float32
            weights: BD3-LM's CUDA cache numerics, see `did_cli.kv_cache`).

    Returns:
        The model in eval mode, with `model.source` (a ModelSource) describing what was loaded.
    """
    weights_dtype = parse_dtype(dtype)
    cache_dtype = check_kv_cache_dtype(kv_cache_dtype, weights_dtype)  # before any download or read
    folder = resolve(name_or_path, revision)
    config = read_config(folder)
    weights = folder / _WEIGHTS
    if not weights.exists():
        raise ModelLoadError(f"{folder} has no {_WEIGHTS}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise ModelLoadError(f"could not read {weights}: {_first_line(exc)}") from None
    if not config.var_min:
        # The config says the metadata buffers are absent (BD3-LM registers them only with var_min); a file that
        # has them anyway carries nothing the model uses.
        state = {k: v for k, v in state.items() if k not in _VAR_MIN_BUFFERS}
    with torch.device("meta"):
        model = BD3LM(config)
    # Checked on the meta model, before allocating: a config that disagrees with the file (a hidden_dim of 10**5)
    # fails here in one line instead of in a huge allocation.
    check_state_dict(model.state_dict(), state, str(weights))
    check_finite(state, str(weights))
    model = model.to_empty(device="cpu")
    # to_empty leaves buffers outside the state dict uninitialised: give the metadata its config values.
    model.sampling_eps_min.fill_(config.sampling_eps_min)
    model.sampling_eps_max.fill_(config.sampling_eps_max)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model = model.to(device=pick_device(device), dtype=weights_dtype).eval()
    model.kv_cache_dtype = cache_dtype
    model.source = ModelSource(name_or_path, str(folder), file_sha256(weights), revision)
    return model


def save_model(model: BD3LM, folder: str | Path, tokenizer: Any = None, *, dtype: torch.dtype | None = None) -> Path:
    """Write a did checkpoint folder atomically (a temporary folder renamed into place).

    The folder holds config.json (BD3-LM's fields, with an `auto_map` to BD3-LM's modeling code, see
    `ModelConfig.to_json_dict`), model.safetensors, the tokenizer files when given, and a README.md model card
    (`did_cli.model_card`). A model BD3-LM's code cannot rebuild (`ModelConfig.bd3lm_code_problem`) is saved with a
    note in config.json instead of an `auto_map`, and a warning.

    Args:
        model: the model to save (its weights in their dtype unless `dtype` is given).
        folder: destination; replaced if it exists.
        tokenizer: a transformers tokenizer to save beside the weights, so the folder is self-contained; its
            portable name (embedded name or Hub id, see TokenizerSource.reference) is also written to config.json's
            `tokenizer`, so a copy of the folder without the tokenizer files still finds it.
        dtype: optional dtype for the stored weights (e.g. bfloat16 to halve the file).
    """
    folder = Path(folder)
    config = model.config
    if tokenizer is not None:
        config = dataclasses.replace(config, tokenizer=tokenizer_source(tokenizer).reference)
    problem = config.bd3lm_code_problem()
    if problem is not None:
        warnings.warn(
            f"{folder}: BD3-LM's modeling code cannot load this model ({problem}); config.json says so and has no "
            "auto_map, so only did loads it",
            stacklevel=2,
        )
    stored = dtype or next(model.parameters()).dtype
    card = render_card(
        config, has_tokenizer_files=tokenizer is not None, weights_dtype=str(stored).removeprefix("torch.")
    )
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
        (staging / "config.json").write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
        (staging / "README.md").write_text(card, encoding="utf-8")
    return folder


def has_tokenizer_files(folder: Path) -> bool:
    """Whether a checkpoint folder ships its own tokenizer."""
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


@dataclass(frozen=True)
class TokenizerSource:
    """Which tokenizer was actually loaded, for provenance; `load_tokenizer` attaches one as `tokenizer.did_source`.

    Attributes:
        name: what to cite: an embedded name (`did-tiny`), a Hub id (`gpt2`), or the absolute folder read.
        path: the absolute local folder the files were read from; None for a Hub id (read from the HF cache).
        reference: a name that resolves on any machine (embedded name or Hub id) for the same tokenizer, or None
            when it exists only as a local folder; `save_model` writes it into config.json.
        vocab_size: ids the tokenizer can produce (`tokenizer_vocab_size`); ids at or above it must never be sampled.
    """

    name: str
    path: str | None
    reference: str | None
    vocab_size: int


# How many embedding rows a model may have beyond its tokenizer's ids: one [MASK] plus padding of the vocabulary up
# to a multiple of 64 or 128 (GPT-2's 50257 tokens are often padded to 50304, plus [MASK]). More means another
# tokenizer: its ids would cover a fraction of what the model learnt, and its samples would decode to nothing.
MAX_VOCAB_PADDING = 128


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Ids a tokenizer can produce: one past its largest id, added tokens included (at least `len(tokenizer)`).

    A sampler must never draw an id at or above this: padded embedding rows decode to nothing.
    """
    source = getattr(tokenizer, "did_source", None)
    if isinstance(source, TokenizerSource):
        return source.vocab_size
    ids = tokenizer.get_vocab().values()
    return max(len(tokenizer), max(ids, default=-1) + 1)


def tokenizer_source(tokenizer: Any) -> TokenizerSource:
    """The TokenizerSource `load_tokenizer` attached, or one built from `name_or_path` for another tokenizer."""
    source = getattr(tokenizer, "did_source", None)
    if isinstance(source, TokenizerSource):
        return source
    name = getattr(tokenizer, "name_or_path", None) or "<in-memory>"
    return TokenizerSource(name, None, None, tokenizer_vocab_size(tokenizer))


def _is_embedded_folder(folder: Path) -> str | None:
    real = folder.resolve()
    return next((name for name, path in EMBEDDED.items() if path.resolve() == real), None)


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that names no existing folder was meant as a path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def hub_unreachable() -> str | None:
    """Why the Hub cannot be asked right now (offline mode, no route), or None; answers in seconds, never retries.

    Without this, huggingface_hub retries an unreachable Hub for about 50 s before giving up.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy only a real request can tell
    endpoint = urlparse(constants.ENDPOINT)
    if not endpoint.hostname:
        return None
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=3).close()
    except OSError:
        return f"{endpoint.hostname} cannot be reached"
    return None


def load_tokenizer(model: BD3LM | str, override: str | None = None) -> Any:
    """The tokenizer for a model, checked against it, with a TokenizerSource attached as `tokenizer.did_source`.

    Resolution: `override` (a name or folder the user gave: embedded name, any folder, relative to the working
    directory, or Hub id); else the checkpoint folder's own tokenizer files; else the tokenizer its config.json names;
    else GPT-2's (BD3-LM's convention, only for a GPT-2-sized vocabulary). A folder named in config.json is resolved
    against the checkpoint folder and must stay inside it: a config is data and may not point anywhere on disk.

    Args:
        model: a loaded model (its tokenizer is checked against its vocabulary), or a tokenizer name or folder.
        override: the user's `--tokenizer`.

    Raises:
        ModelLoadError: in one line; a Hub look-up that cannot happen (offline, unreachable) fails in seconds.
    """
    if override is not None:
        tokenizer = _load_named(override)
    elif isinstance(model, str):
        tokenizer = _load_named(model)
    else:
        source = getattr(model, "source", None)
        tokenizer = _load_for_checkpoint(Path(source.path) if source is not None else None, model.config)
    if isinstance(model, BD3LM):
        check_tokenizer(tokenizer, model.config, tokenizer_source(tokenizer).name)
    return tokenizer


def checkpoint_tokenizer(name_or_path: str, revision: str | None = None) -> Any:
    """The tokenizer `load_tokenizer(load_model(name_or_path))` gives, without loading the weights.

    For callers that decide from files alone whether a model must load at all (the sweep's reuse of sample files).

    Raises:
        ModelLoadError: as `resolve` and `load_tokenizer`.
    """
    folder = resolve(name_or_path, revision)
    config = read_config(folder)
    tokenizer = _load_for_checkpoint(folder, config)
    check_tokenizer(tokenizer, config, tokenizer_source(tokenizer).name)
    return tokenizer


def _load_named(name: str) -> Any:
    """A tokenizer the user named; folders may be anywhere, since the user chose them."""
    if name in EMBEDDED:
        return _load_folder(resolve(name, what="tokenizer"), name, name)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"tokenizer path {name} is a file; pass the folder that holds tokenizer.json")
        if not has_tokenizer_files(path) and (path / "config.json").exists():
            return _load_for_checkpoint(path, read_config(path))
        return _load_folder(path, str(path.resolve()), _config_reference(path))
    if _looks_like_path(name):
        raise ModelLoadError(f"tokenizer folder {name} does not exist")
    return _load_hub(name)


def _load_for_checkpoint(folder: Path | None, config: ModelConfig) -> Any:
    """A checkpoint's own tokenizer files, else the one its config names, else GPT-2's for a GPT-2-sized model."""
    if folder is not None and has_tokenizer_files(folder):
        return _load_folder(folder, str(folder.resolve()), _config_reference(folder))
    reference = config.tokenizer
    where = f"{folder}/config.json" if folder is not None else "the model's config"
    if reference is None:
        if _vocabulary_problem(_GPT2_TOKENS, config) is not None:
            raise ModelLoadError(
                f"{folder or 'the model'} ships no tokenizer files and {where} names none; pass --tokenizer"
            )
        return _load_hub(BD3LM_TOKENIZER)
    if reference in EMBEDDED:
        return _load_folder(resolve(reference, what="tokenizer"), reference, reference)
    if folder is not None:
        local = _folder_inside(folder, reference, where)
        if local is not None:
            return _load_folder(local, str(local.resolve()), None)
    if Path(reference).is_absolute() or _looks_like_path(reference):
        raise ModelLoadError(f"{where} names tokenizer folder {reference!r}, which does not exist; pass --tokenizer")
    return _load_hub(reference)


def _folder_inside(folder: Path, reference: str, where: str) -> Path | None:
    """`reference` as a folder inside the checkpoint `folder`, None when no such folder exists; refuses escapes."""
    candidate = Path(reference)
    escapes = candidate.is_absolute() or reference.startswith("~") or ".." in candidate.parts
    full = folder / candidate
    if not escapes and not full.exists():
        return None
    if escapes or not full.resolve().is_relative_to(folder.resolve()):
        raise ModelLoadError(
            f"{where} names tokenizer {reference!r}, outside the model folder; pass --tokenizer to use it anyway"
        )
    if not full.is_dir() or not has_tokenizer_files(full):
        raise ModelLoadError(f"{where} names tokenizer folder {reference!r}, which holds no tokenizer.json")
    return full


def _config_reference(folder: Path) -> str | None:
    """The portable tokenizer name a did checkpoint's config.json records beside its tokenizer files, if any."""
    try:
        body = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    reference = body.get("tokenizer") if isinstance(body, dict) and body.get("model_type") == "bd3lm" else None
    if not isinstance(reference, str):
        return None
    return reference if reference in EMBEDDED or not _looks_like_path(reference) else None


def _load_folder(folder: Path, name: str, reference: str | None) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = _is_embedded_folder(folder) or name
    try:
        if (folder / "tokenizer.json").exists():
            # Loading through AutoTokenizer would read the folder's config.json (model_type bd3lm, unknown to
            # transformers) and warn; a tokenizer.json is all a fast tokenizer needs.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers and tokenizers raise many types for missing or corrupt files
        raise ModelLoadError(f"could not load tokenizer {name!r}: {_first_line(exc)}") from None
    return _attach(tokenizer, name, str(folder.resolve()), reference or _is_embedded_folder(folder))


def _load_hub(repo_id: str) -> Any:
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoTokenizer

    try:
        cached = any(
            isinstance(try_to_load_from_cache(repo_id, file), str)
            for file in ("tokenizer_config.json", "tokenizer.json", "vocab.json")
        )
    except ValueError:  # huggingface_hub's HFValidationError: not a valid repository id
        raise ModelLoadError(f"tokenizer {repo_id!r} is neither an existing folder nor a valid Hub id") from None
    offline = hub_unreachable()
    if offline is not None and not cached:
        raise ModelLoadError(
            f"tokenizer {repo_id!r} is not in the local Hugging Face cache and {offline}; "
            "pass --tokenizer FOLDER (a folder with tokenizer.json)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=offline is not None)
    except Exception as exc:  # transformers and tokenizers raise many types for missing or corrupt files
        raise ModelLoadError(f"could not load tokenizer {repo_id!r}: {_first_line(exc)}; pass --tokenizer") from None
    return _attach(tokenizer, repo_id, None, repo_id)


def _attach(tokenizer: Any, name: str, path: str | None, reference: str | None) -> Any:
    tokenizer.did_source = TokenizerSource(name, path, reference, tokenizer_vocab_size(tokenizer))
    return tokenizer


_GPT2_TOKENS = 50257


def _vocabulary_problem(tokens: int, config: ModelConfig) -> str | None:
    """Why a tokenizer with `tokens` ids cannot drive a model with this config, or None (see MAX_VOCAB_PADDING)."""
    if tokens > config.vocab_size:
        return f"has {tokens} tokens but the model's vocabulary is {config.vocab_size}"
    if config.mask_id < tokens:
        return f"uses id {config.mask_id}, which the model reserves for [MASK]"
    if config.vocab_size - tokens > MAX_VOCAB_PADDING:
        return (
            f"has {tokens} tokens but the model's vocabulary is {config.vocab_size}; more than {MAX_VOCAB_PADDING} "
            "rows beyond the tokenizer ([MASK] plus padding) means another tokenizer"
        )
    return None


def check_tokenizer(tokenizer: Any, config: ModelConfig, name: str = "tokenizer") -> None:
    """Refuse a tokenizer that does not fit the model's vocabulary.

    The rule: every tokenizer id is below the model's vocabulary size and below its [MASK] id, and the model has at
    most MAX_VOCAB_PADDING (128) rows beyond the tokenizer's ids ([MASK] plus padding to a multiple of 64 or 128).
    """
    problem = _vocabulary_problem(tokenizer_vocab_size(tokenizer), config)
    if problem is not None:
        raise ModelLoadError(f"{name} {problem}; pass the model's tokenizer with --tokenizer")
    if bos_token_id(tokenizer) is None:
        raise ModelLoadError(f"{name} has neither a BOS nor an EOS token to start unconditional samples with")


def bos_token_id(tokenizer: Any) -> int | None:
    """The id that starts a sample: BOS, or EOS for GPT-2-style tokenizers where they are the same token."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

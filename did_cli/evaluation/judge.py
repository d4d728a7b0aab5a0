"""The judge of generative perplexity: a transformers causal LM and its tokenizer, loaded by name, folder or Hub id.

Kept apart from the scoring in `evaluation` so that the scoring functions stay pure (token ids and a logits callable
in, numbers out) and can be tested with a fake judge. Loading goes through `checkpoints.resolve`, so embedded names
(`did-tiny-judge`), local folders and the Hugging Face cache (`revision`, `HF_HUB_OFFLINE`) work as for did's own
models, and `info` records the exact weights for provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from did_cli.checkpoints import EMBEDDED, bos_token_id, file_sha256, parse_dtype, pick_device, resolve
from did_cli.errors import ModelLoadError
from did_cli.evaluation.settings import DEFAULT_JUDGE

__all__ = ["DEFAULT_JUDGE", "Judge", "load_judge"]


@dataclass
class Judge:
    """A causal LM and its tokenizer that score samples; `info` records which one, for provenance.

    Calling a judge maps (input_ids [B, T], attention_mask [B, T]) to logits [B, T, V] on the model's device, so
    it is a `LogitsFn` for `target_nlls`.
    """

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=lambda: {"name": "<in-memory>"})

    def __post_init__(self) -> None:
        if bos_token_id(self.tokenizer) is None:
            raise ModelLoadError(f"judge {self.info.get('name')!r} has neither a BOS nor an EOS token to start with")

    @property
    def max_positions(self) -> int | None:
        """The most tokens the judge accepts (None when its config does not say)."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def bos_id(self) -> int:
        """The id every sample starts with: BOS, or EOS for GPT-2 where they are one token (`<|endoftext|>`)."""
        return bos_token_id(self.tokenizer)

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids excluded as targets: the tokenizer's EOS and any the model config declares."""
        declared = getattr(self.model.config, "eos_token_id", None)
        ids = set(declared if isinstance(declared, list) else [declared]) | {self.tokenizer.eos_token_id}
        return frozenset(i for i in ids if i is not None)

    def encode(self, text: str) -> list[int]:
        """Judge token ids of a text, without special tokens added (an `<|endoftext|>` in the text stays one)."""
        # verbose=False: texts longer than the judge's context are expected here; the sliding window handles them.
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for right-padded input_ids [B, T] with attention_mask [B, T] (1 = real token)."""
        device = next(self.model.parameters()).device
        output = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        return output.logits


def load_judge(
    name_or_path: str = DEFAULT_JUDGE,
    *,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Judge:
    """Load a causal LM and its tokenizer from an embedded name, a folder, or a Hugging Face Hub id.

    Args:
        name_or_path: `gpt2-large` (the published protocol), `did-tiny-judge`, a folder saved by
            `save_pretrained` with its tokenizer, or any Hub id transformers can load as a causal LM.
        revision: Hub revision to pin.
        device: `auto` (default), `cpu`, `cuda`, or a torch device.
        dtype: float32 by default, as upstream scores in fp32.

    Raises:
        ModelLoadError: one line saying what is missing; when offline without a cached copy, how to pass a folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _resolve_judge(name_or_path, revision)
    torch_device, torch_dtype = pick_device(device), parse_dtype(dtype)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(folder))
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load judge {name_or_path!r} from {folder}: {_first_line(exc)}") from None
    # Cast after loading rather than via from_pretrained's dtype argument, whose name changed across transformers.
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    info = {
        "name": name_or_path,
        "path": str(folder),
        "revision": revision,
        # The Hub cache names each snapshot folder after its commit.
        "commit": folder.name if folder.parent.name == "snapshots" else None,
        "sha256": _weights_sha256(folder),
    }
    return Judge(model, tokenizer, info)


def _resolve_judge(name_or_path: str, revision: str | None) -> Path:
    try:
        return resolve(name_or_path, revision, what="judge")
    except ModelLoadError as exc:
        message = str(exc)
        if name_or_path not in EMBEDDED and message.endswith("pass a local folder"):
            raise ModelLoadError(
                f"{message} with --judge FOLDER (from save_pretrained, with its tokenizer), or score offline with "
                "the embedded --judge did-tiny-judge"
            ) from None
        raise


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # transformers draws a weight-loading bar and logs notices on stderr; the command's own output is the table.
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _weights_sha256(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Model configuration, mirroring the `config.json` that BD3-LM publishes on the Hub.

`ModelConfig` holds exactly the fields that change the denoiser's computation. The field names are BD3-LM's
(`hidden_dim`, `n_blocks`, `model_length`, ...) so that a BD3-LM `config.json` reads into it without a mapping and a
`did` checkpoint stays readable by BD3-LM tooling. `did`-only fields (`mask_id`, `tokenizer`) are written beside them.

A saved `config.json` also lets transformers load the checkpoint with BD3-LM's own modeling code: `auto_map` points
at the Hub repository that publishes it (`BD3LM_CODE_REPOSITORY`, transformers' `repo--module.Class` form, so no code
is copied into did), and every field of BD3-LM's `BD3LMConfig` is written, since its defaults are not the released
models' values (`cond_dim` 129, `attn_backend` flex, `block_size` 1). transformers reads no revision from such a
reference: it fetches the code at the `code_revision` given to `from_pretrained` (default: that repository's main).
A checkpoint BD3-LM's code cannot rebuild (`bd3lm_code_problem`) gets no `auto_map` and a note saying why.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from did_cli.errors import InputError, ModelLoadError, UsageError

# Named shapes for `did finetune --init`. `small` is the 110M BD3-LM/MDLM DiT; `tiny` is what fits CPU training.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_dim": 256, "cond_dim": 64, "n_blocks": 4, "n_heads": 4},
    "small": {"hidden_dim": 768, "cond_dim": 128, "n_blocks": 12, "n_heads": 12},
}

# The Hub repository whose configuration_bd3lm.py / modeling_bd3lm.py a did checkpoint's auto_map names.
BD3LM_CODE_REPOSITORY = "kuleshov-group/bd3lm-owt-block_size4"
# What transformers fetches without `code_revision=`: the repository's default branch.
BD3LM_CODE_REVISION = "main"
AUTO_MAP = {
    "AutoConfig": f"{BD3LM_CODE_REPOSITORY}--configuration_bd3lm.BD3LMConfig",
    "AutoModelForMaskedLM": f"{BD3LM_CODE_REPOSITORY}--modeling_bd3lm.BD3LM",
}
# The arguments of BD3-LM's BD3LMConfig: all are written to config.json (none may fall back to its defaults).
BD3LM_CONFIG_FIELDS = (
    "block_size",
    "vocab_size",
    "model_length",
    "cross_attn",
    "adaln",
    "attn_backend",
    "causal",
    "hidden_dim",
    "cond_dim",
    "n_blocks",
    "n_heads",
    "dropout",
    "time_conditioning",
    "var_min",
    "sampling_eps_min",
    "sampling_eps_max",
)
# The config.json key that says why BD3-LM's code cannot load a checkpoint (then there is no auto_map).
TRANSFORMERS_NOTE = "did_transformers_note"
# BD3-LM's DDiTBlock builds its MLP with this ratio; BD3LMConfig has no field to change it.
_BD3LM_MLP_RATIO = 4


@dataclass(frozen=True)
class ModelConfig:
    """Shape and conventions of a BD3-LM denoiser.

    Attributes:
        vocab_size: rows of the embedding and of the output layer: the tokenizer's vocabulary plus one [MASK].
        model_length: the longest sequence the model was trained on (L); sampling may use any length up to it.
        hidden_dim: width of the residual stream.
        cond_dim: width of the (sigma) conditioning vector that drives adaLN.
        n_blocks: number of transformer blocks.
        n_heads: attention heads; `hidden_dim` must be a multiple.
        dropout: residual-branch dropout, active only in training mode.
        mask_id: the [MASK] token id; BD3-LM uses the tokenizer's vocabulary size (50257 for GPT-2).
        block_size: the block size the checkpoint was trained with (metadata; any block size can be run).
        time_conditioning: BD3-LM's released models set this false, so sigma is zero at every call.
        mlp_ratio: MLP width over `hidden_dim`.
        tokenizer: the tokenizer the checkpoint was trained with, used when the folder ships no tokenizer files: an
            embedded name, a Hub id, or a folder relative to the checkpoint folder (never outside it).
        sampling_eps_min: lower end of the clipped noise interval the checkpoint was trained with (metadata).
        sampling_eps_max: upper end of that interval (metadata).
        var_min: BD3-LM's flag for the learned noise interval; only when it is true does the weights file hold the
            `sampling_eps_min/max` buffers.
    """

    vocab_size: int
    model_length: int = 1024
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1
    mask_id: int | None = None
    block_size: int = 4
    time_conditioning: bool = False
    mlp_ratio: int = 4
    tokenizer: str | None = None
    sampling_eps_min: float = 1e-3
    sampling_eps_max: float = 1.0
    var_min: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.mask_id is None:
            object.__setattr__(self, "mask_id", self.vocab_size - 1)
        if self.hidden_dim % self.n_heads:
            raise UsageError(f"hidden_dim {self.hidden_dim} is not a multiple of n_heads {self.n_heads}")
        if (self.hidden_dim // self.n_heads) % 2:
            raise UsageError("the head dimension must be even for rotary embeddings")
        if not 0 <= self.mask_id < self.vocab_size:
            raise UsageError(f"mask_id {self.mask_id} is outside the vocabulary of size {self.vocab_size}")
        if not 0.0 <= self.sampling_eps_min <= self.sampling_eps_max <= 1.0:
            raise UsageError(
                f"sampling_eps_min {self.sampling_eps_min} and sampling_eps_max {self.sampling_eps_max} must satisfy "
                "0 <= min <= max <= 1"
            )
        if self.time_conditioning:
            # Released BD3-LM models and the DiD paper use a time-independent denoiser; per-block noise levels
            # have no single sigma per sequence, so honouring this flag would silently compute something else.
            raise ModelLoadError("time_conditioning=true is not supported: did runs time-independent BD3-LM models")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_dim // self.n_heads

    def num_parameters(self) -> int:
        """Parameter count of the denoiser this config describes (embedding and output layer included)."""
        d, c, v = self.hidden_dim, self.cond_dim, self.vocab_size
        per_block = 2 * d + 3 * d * d + d * d + 2 * self.mlp_ratio * d * d + self.mlp_ratio * d + d + c * 6 * d + 6 * d
        sigma_map = 256 * c + c + c * c + c
        output = d + d * v + v + c * 2 * d + 2 * d
        return v * d + sigma_map + self.n_blocks * per_block + output

    def bd3lm_code_problem(self) -> str | None:
        """Why BD3-LM's own modeling code (transformers, trust_remote_code) cannot rebuild this model, or None.

        Every other field maps onto a `BD3LMConfig` field with the same logits; `time_conditioning` is refused on
        construction.
        """
        if self.mlp_ratio != _BD3LM_MLP_RATIO:
            return f"mlp_ratio {self.mlp_ratio}: BD3-LM's code always builds MLPs of {_BD3LM_MLP_RATIO} x hidden_dim"
        return None

    def to_json_dict(self) -> dict[str, Any]:
        """The `config.json` body: BD3-LM's fields first, so BD3-LM tooling can read it.

        With an `auto_map` to BD3-LM's modeling code when it can rebuild the model (`bd3lm_code_problem`), else a
        `did_transformers_note` saying why not. `mask_index` repeats `mask_id` under the name diffusers'
        BD3LMPipeline reads.
        """
        body = {
            "architectures": ["BD3LM"],
            "model_type": "bd3lm",
            "attn_backend": "sdpa",
            "cross_attn": True,
            "adaln": True,
            "causal": False,
            "return_dict": False,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"},
            "mask_index": self.mask_id,
        }
        problem = self.bd3lm_code_problem()
        if problem is None:
            body["auto_map"] = dict(AUTO_MAP)
        else:
            body[TRANSFORMERS_NOTE] = (
                f"BD3-LM's modeling code cannot load this checkpoint ({problem}); load it with did"
            )
        # A read config's auto_map (a Hub config's names files that a saved folder does not have) and an old note are
        # replaced, never carried over.
        extra = {k: v for k, v in self.extra.items() if k not in ("auto_map", TRANSFORMERS_NOTE)}
        return {**extra, **body}

    @classmethod
    def from_json_dict(cls, body: Any) -> ModelConfig:
        """Read a BD3-LM or did `config.json`, keeping unknown fields in `extra` so a round trip loses nothing.

        Raises:
            InputError: the body is not an object, lacks `vocab_size`, or has a field of the wrong type or range.
            ModelLoadError: a well-formed config for a model did does not run (autoregressive, time-conditioned).
        """
        if not isinstance(body, dict):
            raise InputError(f"config.json must hold a JSON object, not a {type(body).__name__}")
        if body.get("model_type") not in ("bd3lm", None):
            raise ModelLoadError(f"config.json has model_type {body.get('model_type')!r}; expected 'bd3lm'")
        if body.get("adaln") is False:
            raise ModelLoadError("config.json sets adaln=false; did only runs BD3-LM's adaLN denoiser")
        if body.get("causal"):
            raise ModelLoadError("config.json sets causal=true (an autoregressive model); did needs a denoiser")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "vocab_size" not in body:
            raise InputError("config.json has no vocab_size")
        kwargs = {k: v for k, v in body.items() if k in known}
        extra = {k: v for k, v in body.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except UsageError as exc:
            raise InputError(f"config.json: {exc}") from None

    @classmethod
    def from_preset(cls, preset: str, *, vocab_size: int, model_length: int, **overrides: Any) -> ModelConfig:
        """A fresh model shape: one of `PRESETS` with the tokenizer's vocabulary and the training length."""
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        shape = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(vocab_size=vocab_size, model_length=model_length, **shape)


_INT_FIELDS = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads", "block_size", "mlp_ratio")


def _check_field_types(config: ModelConfig) -> None:
    """Types and ranges of every field, so a hand-edited or foreign config.json fails in one line, not deep in torch.

    JSON integers are accepted for float fields and normalised to float (BD3-LM writes `sampling_eps_max: 1`).
    """
    for name in _INT_FIELDS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if config.mask_id is not None and (isinstance(config.mask_id, bool) or not isinstance(config.mask_id, int)):
        raise UsageError(f"mask_id must be an integer, got {config.mask_id!r}")
    for name in ("dropout", "sampling_eps_min", "sampling_eps_max"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number, got {value!r}")
        object.__setattr__(config, name, float(value))
    if not 0.0 <= config.dropout < 1.0:
        raise UsageError(f"dropout must be in [0, 1), got {config.dropout}")
    for name in ("time_conditioning", "var_min"):
        if not isinstance(getattr(config, name), bool):
            raise UsageError(f"{name} must be true or false, got {getattr(config, name)!r}")
    if config.tokenizer is not None and (not isinstance(config.tokenizer, str) or not config.tokenizer.strip()):
        raise UsageError(f"tokenizer must be a name or a folder, got {config.tokenizer!r}")

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


def default_micro_batch_size(rows_per_process: int, cap: int = 16) -> int:
    """The default rows per forward pass: the largest divisor of the per-process batch that is at most `cap`.

    So `--batch-size 8` trains with micro-batches of 8, 512 on one process with 16, and 24 with 12, no flag needed.
    """
    return max(size for size in range(1, min(cap, rows_per_process) + 1) if rows_per_process % size == 0)


# How a model runs, as names: each is checked here, before torch is imported, so a misspelt flag fails at once;
# `checkpoints`, `kv_cache` and `attention` map the names to torch objects.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
KV_CACHE_DTYPE_NAMES = ("float32", "bfloat16")
ATTN_BACKENDS = ("auto", "sdpa", "flex")


def dtype_name(dtype: str) -> str:
    """The canonical name of a weights dtype (`bf16` → `bfloat16`).

    Raises:
        UsageError: a name that is no dtype did runs in, listing the choices.
    """
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


def check_kv_cache_dtype_name(name: str | None) -> None:
    """Refuse a KV cache dtype name did does not offer (None: the weights' dtype)."""
    if name is not None and name not in KV_CACHE_DTYPE_NAMES:
        raise UsageError(f"unknown KV cache dtype {name!r}; use {' or '.join(KV_CACHE_DTYPE_NAMES)}")


def check_attn_backend(choice: str) -> str:
    """Return `choice` if it names an attention backend, else raise a one-line UsageError."""
    if choice not in ATTN_BACKENDS:
        raise UsageError(f"--attn-backend must be one of {', '.join(ATTN_BACKENDS)}, got {choice!r}")
    return choice


def check_device_name(device: str) -> None:
    """Refuse what cannot be a device name (`auto`, or a type with an optional index: `cpu`, `cuda:1`).

    Whether the type exists (and the device is present) is torch's to say when the model loads.
    """
    kind, colon, index = device.partition(":")
    named = kind.isascii() and kind.isalpha() and kind.islower() and (not colon or index.isdigit())
    if device != "auto" and not named:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


UNMASKING_ORDERS = ("first-hitting", "steps", "confidence")
# The one list of remask strategy names; `did_cli.sampling.remask` maps each to its score function (a test checks
# that the two agree), so settings can be checked here without importing the sampler.
REMASK_STRATEGIES = (
    "snapshot",
    "posthoc",
    "random",
    "snapshot-entropy",
    "snapshot-margin",
    "energy",
    "mc-dropout",
    "mc-variance",
    "noise-ensemble",
)
# Other spellings users write (the paper says "post-hoc"); every name is looked up through `canonical_remask`.
REMASK_ALIASES = {"post-hoc": "posthoc", "post_hoc": "posthoc"} | {
    name.replace("-", "_"): name for name in REMASK_STRATEGIES if "-" in name
}
# Editing (`EditSettings`) revises without remasking; the sweep's strategy axis takes it by this name.
EDIT = "edit"
EDIT_CANDIDATES = ("argmax", "sampled")


def canonical_remask(name: str) -> str:
    """The strategy's canonical name (`post-hoc` → `posthoc`, case ignored).

    Raises:
        UsageError: a name that is no strategy, listing the choices.
    """
    key = name.strip().lower()
    key = REMASK_ALIASES.get(key, key)
    if key not in REMASK_STRATEGIES:
        raise UsageError(f"unknown remask strategy {name!r}; choose one of {', '.join(REMASK_STRATEGIES)}")
    return key


@dataclass(frozen=True)
class UnmaskingSettings:
    """How a stage turns [MASK]s into tokens: which positions each model call commits, and how tokens are drawn.

    Attributes:
        order: `first-hitting` (BD3-LM's default: masked positions are committed in a uniformly random order,
            `tokens_per_call` per model call), `steps` (a fixed number of DDPM-style steps per block: each masked
            token is revealed at a uniformly random time, binned into `steps_per_block` calls) or `confidence`
            (commit the masked position whose sampled token the model is most sure of).
        steps_per_block: number of steps per block for `order="steps"`.
        tokens_per_call: tokens committed per model call for `first-hitting` and `confidence` (1 = BD3-LM).
        confidence_threshold: with `order="confidence"`, commit every masked position of the current block whose
            sampled token has a probability above it, and at least the most confident one (threshold-based parallel
            decoding, as in Fast-dLLM). Calls are spent where the model is unsure: a confident stretch is committed
            in one call, a doubtful one token by token. None (the default) commits `tokens_per_call` per call.
        top_p: nucleus mass; tokens are kept while the cumulative probability stays within it (BD3-LM's rule).
        temperature: softmax temperature applied before the nucleus filter.
    """

    order: str = "first-hitting"
    steps_per_block: int | None = None
    tokens_per_call: int = 1
    top_p: float = 0.9
    temperature: float = 1.0
    confidence_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.order not in UNMASKING_ORDERS:
            raise UsageError(f"unknown unmasking order {self.order!r}; choose one of {', '.join(UNMASKING_ORDERS)}")
        if self.order == "steps" and (self.steps_per_block is None or self.steps_per_block < 1):
            raise UsageError("steps_per_block must be a positive integer with the 'steps' order")
        if self.tokens_per_call < 1:
            raise UsageError(f"tokens_per_call must be at least 1, got {self.tokens_per_call}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.temperature < math.inf:
            raise UsageError(f"temperature must be a positive finite number, got {self.temperature}")
        if self.confidence_threshold is not None:
            if not 0.0 <= self.confidence_threshold <= 1.0:
                raise UsageError(f"--confidence-threshold must be in [0, 1], got {self.confidence_threshold}")
            if self.order != "confidence":
                raise UsageError(f"--confidence-threshold needs --order confidence, not --order {self.order}")
            if self.tokens_per_call != 1:
                raise UsageError("--confidence-threshold decides the tokens per call; drop --tokens-per-call")


@dataclass(frozen=True)
class DraftSettings:
    """Stage 1: semi-autoregressive drafting with block size B1 (`block_size`) over `length` tokens.

    `length` counts the whole sequence, BOS and prompt included, like BD3-LM's `model.length`.

    Attributes:
        length: sequence length L.
        block_size: draft block size B1.
        kv_cache: use the KV cache (False runs the uncached oracle).
        unmasking: unmasking order and token sampling.
        reject_entropy: after each block, once the sequence so far is longer than `entropy_window` tokens, a
            sample whose last `entropy_window` tokens have a unigram entropy below this (nats) is discarded and
            drawn again, as BD3-LM's sampler does (4.0); 0 turns the check off.
        max_tries: draws per sample before sampling fails (BD3-LM: 10).
        entropy_window: tokens the entropy check looks at, and the length a sample must pass before any stop
            condition is checked (BD3-LM: 256 for both).
        var_length: BD3-LM's `sampling.var_length`: at the first check (once the sample is longer than
            `entropy_window`) or a later one, a sample holding a generated EOS stops and is cut just after the first
            one, which it keeps; on low entropy it drops its last `entropy_window` tokens and stops instead of being
            redrawn (this cut wins). At block size 1 a stopped sample is redrawn instead, as upstream does.
    """

    length: int
    block_size: int = 4
    kv_cache: bool = True
    unmasking: UnmaskingSettings = field(default_factory=UnmaskingSettings)
    reject_entropy: float = 4.0
    max_tries: int = 10
    entropy_window: int = 256
    var_length: bool = False

    def __post_init__(self) -> None:
        if self.length < 2:
            raise UsageError(f"length must be at least 2, got {self.length}")
        check_block_size(self.block_size, self.length)
        if not 0.0 <= self.reject_entropy < math.inf:
            raise UsageError(
                f"reject_entropy must be a finite number of nats >= 0 (0 turns it off), got {self.reject_entropy}"
            )
        if self.max_tries < 1:
            raise UsageError(f"--max-tries must be at least 1, got {self.max_tries}")
        if self.entropy_window < 1:
            raise UsageError(f"the entropy window must be at least 1 token, got {self.entropy_window}")


@dataclass(frozen=True)
class RefineSettings:
    """Stage k > 1: remask the `gamma` fraction of generated tokens chosen by `remask`, re-denoise with B2.

    `block_size` None means one global block (the whole sequence, fully bidirectional), the paper's B2 = L.
    `refine_cache` R > 1 (global block only) reuses the keys and values of kept (never remasked) positions for R
    calls before recomputing them; only the remasked positions run through the model in between. R = 1 recomputes
    everything at every call: the exact refinement, and the default. `passes` (M) and `ensemble_ratio` are read by
    the strategies that score with several model calls (`mc-dropout`, `mc-variance`, `noise-ensemble`; see
    `did_cli.sampling.remask`).
    """

    gamma: float = 0.5
    block_size: int | None = None
    remask: str = "snapshot"
    kv_cache: bool = True
    unmasking: UnmaskingSettings = field(default_factory=UnmaskingSettings)
    refine_cache: int = 1
    passes: int = 8
    ensemble_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise UsageError(f"gamma must be in [0, 1], got {self.gamma}")
        object.__setattr__(self, "remask", canonical_remask(self.remask))
        if self.block_size is not None and self.block_size < 1:
            raise UsageError(f"block_size must be positive, got {self.block_size}")
        if isinstance(self.refine_cache, bool) or not isinstance(self.refine_cache, int) or self.refine_cache < 1:
            raise UsageError(f"--refine-cache must be a positive integer (1 = exact), got {self.refine_cache!r}")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or not 1 <= self.passes <= 1024:
            raise UsageError(f"--passes must be an integer from 1 to 1024, got {self.passes!r}")
        if not 0.0 < self.ensemble_ratio < 1.0:
            raise UsageError(f"--ensemble-ratio must be in (0, 1), got {self.ensemble_ratio}")
        # The one home of this rule: kept keys/values can only be reused when every call sees the whole sequence.
        if self.refine_cache > 1 and self.block_size is not None:
            raise UsageError(
                f"--refine-cache {self.refine_cache} needs one global refine block (B2 = L), not a refine block size "
                f"of {self.block_size}; drop --block-size"
            )


@dataclass(frozen=True)
class EditSettings:
    """A revision stage that remasks nothing: committed tokens the model would now replace are replaced in place.

    Each of `passes` global passes (one bidirectional block over the clean sequence) reads the model's distribution
    at every generated position; a token is replaced when the candidate (the argmax, or a token drawn with the
    `unmasking` top-p and temperature) differs from it and the model gives the candidate a probability above
    `threshold`. This is LLaDA 2.x's editing rule, applied globally to a finished draft. A threshold of 1 changes
    nothing.

    Attributes:
        threshold: the candidate's probability must exceed it, in [0, 1].
        passes: R, global passes (each sees the previous pass's edits).
        candidate: `argmax` or `sampled`.
        unmasking: top-p and temperature of `sampled` candidates.
    """

    threshold: float = 0.9
    passes: int = 1
    candidate: str = "argmax"
    unmasking: UnmaskingSettings = field(default_factory=UnmaskingSettings)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--edit-threshold must be in [0, 1], got {self.threshold}")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or not 1 <= self.passes <= 1024:
            raise UsageError(f"--edit-passes must be an integer from 1 to 1024, got {self.passes!r}")
        if self.candidate not in EDIT_CANDIDATES:
            raise UsageError(f"--edit-candidate must be {' or '.join(EDIT_CANDIDATES)}, got {self.candidate!r}")


def check_block_size(block_size: int, length: int) -> None:
    """A block size must divide the length, unless it covers the whole sequence (one global block)."""
    if block_size < 1:
        raise UsageError(f"block size must be positive, got {block_size}")
    if block_size < length and length % block_size:
        raise UsageError(f"block size {block_size} does not divide the length {length}")


# The most optimizer steps a run may ask for: BD3-LM's runs take about 1M; a thousand times that is a typo.
MAX_FINETUNE_STEPS = 10**9


@dataclass(frozen=True)
class FinetuneSettings:
    """One `did finetune` run. Defaults reproduce the DiD paper's run from BD3-LM's block-1024 pretrain checkpoint.

    Attributes:
        out: run folder (checkpoints/, metrics.jsonl, final/).
        model: checkpoint to start from (name, folder or Hub id); ignored when `init` is set.
        init: a preset name (`tiny`, `small`) to build a fresh model instead.
        init_overrides: shape fields overriding the preset (hidden_dim, n_blocks, n_heads, cond_dim, dropout).
        tokenizer: tokenizer id or folder (default: the checkpoint's; required with `init` unless it is gpt2).
        data: a Hugging Face dataset id or local .txt/.jsonl/.parquet files.
        data_config: dataset configuration (Hub datasets).
        data_split: dataset split (Hub datasets).
        text_field: text column.
        txt_documents: `lines` or `file` (how .txt files split into documents).
        val_fraction: share of documents held out for validation (when `valid_data` is not given).
        valid_data: a separate validation source (same forms as `data`); then nothing is held out of `data`.
        mix: block-size mix, e.g. "4:0.9,1024:0.1" (a single "16:1" is plain BD3-LM training).
        steps: optimizer steps in total (a resumed run continues to this number).
        batch_size: global batch per optimizer step (all processes and accumulation steps together).
        micro_batch_size: rows per forward pass per process; None picks `default_micro_batch_size` of the
            per-process batch (at most 16).
        lr: peak learning rate (AdamW, betas 0.9/0.999, no weight decay).
        warmup: linear warmup steps; constant afterwards.
        seq_len: sequence length L (default: the model's length).
        save_every: checkpoint interval in steps.
        keep_last: checkpoints kept.
        resume: continue from the latest checkpoint in `out`.
        seed: seeds initialisation, data order, block-size draws and noise.
        clip: (eps_min, eps_max) interval for t, such intervals per block size ({4: (0.5, 1.0)}), or "auto" (search
            the lowest-variance interval per block size at each validation, BD3-LM's var_min).
        resample: redraw blocks whose masked fraction is outside `clip` (BD3-LM's training.resample).
        ema: EMA decay.
        grad_clip: gradient-norm clip.
        val_every: validation interval in steps (0: only at the end of the run).
        val_batches: validation batches of `VALIDATION_BATCH_ROWS` (16) held-out rows per evaluation (0 disables
            validation); the rows validated never depend on `micro_batch_size` or the number of processes.
        require_validation: stop with an error when the held-out split is shorter than one sequence (validation
            cannot run) rather than skipping validation with a note. The CLI sets it when --val-every (above 0) or
            --val-fraction (above 0) is given; --valid-data always requires validation.
        log_every: logging interval in steps.
        mixed_precision: `auto` (bf16 where supported on GPU, else none), `no`, `bf16` or `fp16`.
        cache_dir: where tokenised corpora are cached.
        num_proc: processes for tokenisation.
        report_to: accelerate trackers (e.g. tensorboard, wandb) besides metrics.jsonl; each must be installed.
        attn_backend: attention kernels: `auto` (flex attention on CUDA, SDPA elsewhere), `sdpa` or `flex`.
        compile: `torch.compile` the transformer blocks (the training form has one shape per block size).
        gradient_checkpointing: recompute each block's activations in the backward pass to save memory.
    """

    out: str = "runs/did-finetune"
    model: str = "kuleshov-group/bd3lm-owt-block_size1024-pretrain"
    init: str | None = None
    init_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    data: str = "openwebtext"
    data_config: str | None = None
    data_split: str = "train"
    text_field: str = "text"
    txt_documents: str = "lines"
    val_fraction: float = 0.01
    valid_data: str | None = None
    mix: str = "4:0.9,1024:0.1"
    steps: int = 40_000
    batch_size: int = 512
    micro_batch_size: int | None = None
    lr: float = 3e-4
    warmup: int = 2500
    seq_len: int | None = None
    save_every: int = 1000
    keep_last: int = 3
    resume: bool = False
    seed: int = 0
    clip: tuple[float, float] | dict[int, tuple[float, float]] | str = (1e-3, 1.0)
    resample: bool = True
    ema: float = 0.9999
    grad_clip: float = 1.0
    val_every: int = 1000
    val_batches: int = 8
    require_validation: bool = False
    log_every: int = 10
    mixed_precision: str = "auto"
    cache_dir: str | None = None
    num_proc: int | None = None
    report_to: tuple[str, ...] = ()
    attn_backend: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.seq_len is not None and self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2 (BOS and one token), got {self.seq_len}")
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "micro_batch_size": 1 if self.micro_batch_size is None else self.micro_batch_size,
            "save_every": self.save_every,
            "keep_last": self.keep_last,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.steps > MAX_FINETUNE_STEPS:
            raise UsageError(
                f"--steps must be at most {MAX_FINETUNE_STEPS:,} (BD3-LM's runs take about 1M), got {self.steps}"
            )
        if self.warmup < 0 or self.val_every < 0 or self.val_batches < 0:
            raise UsageError("--warmup, --val-every and --val-batches must be non-negative")
        # `not x > 0` rather than `x <= 0`: NaN compares false both ways and must be refused too.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive finite number, got {self.lr}")
        if not self.grad_clip > 0:
            raise UsageError(f"--grad-clip must be positive, got {self.grad_clip}")
        if not 0.0 <= self.ema < 1.0:
            raise UsageError(f"--ema must be in [0, 1) (0 exports the last weights), got {self.ema}")
        dropout = self.init_overrides.get("dropout")
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
        check_trackers(self.report_to)
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise UsageError(f"--mixed-precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.txt_documents not in ("lines", "file"):
            raise UsageError(f"--txt-documents must be lines or file, got {self.txt_documents!r}")
        if isinstance(self.clip, str) and self.clip != "auto":
            raise UsageError(f"--clip must be an interval, per-size intervals or auto, got {self.clip!r}")
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            raise UsageError(f"--attn-backend must be auto, sdpa or flex, got {self.attn_backend!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


def check_trackers(names: tuple[str, ...]) -> None:
    """Refuse an unknown `--report-to` name, or a tracker whose package is not installed, before any work starts."""
    if not names:
        return
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [kind.value for kind in LoggerType]
    available = {str(getattr(kind, "value", kind)) for kind in get_available_trackers()}
    for name in names:
        if name not in known:
            raise UsageError(f"unknown --report-to {name!r}; choose from {', '.join(known)}")
        if name == "all" and not available:
            raise UsageError("--report-to all: no tracker is installed (pip install tensorboard, or wandb, ...)")
        if name != "all" and name not in available:
            raise UsageError(f"--report-to {name}: the {name} package is not installed; install it or drop the flag")

"""Run settings, checked when they are built: how a model runs, how each stage samples, and a fine-tuning run.

`UnmaskingSettings`, `DraftSettings`, `RefineSettings`, `EditSettings` and `FinetuneSettings` are frozen dataclasses
that refuse bad values in `__post_init__` with one line naming the option; the names of dtypes, devices, attention
backends and remask strategies are checked here too, before torch is imported, so a misspelt flag fails at once. The
model's own shape is `did_cli.config.ModelConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from did_cli.errors import UsageError


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

"""Model configuration, mirroring the `config.json` that BD3-LM publishes on the Hub.

`ModelConfig` holds exactly the fields that change the denoiser's computation. The field names are BD3-LM's
(`hidden_dim`, `n_blocks`, `model_length`, ...) so that a BD3-LM `config.json` reads into it without a mapping and a
`did` checkpoint stays readable by BD3-LM tooling. `did`-only fields (`mask_id`, `tokenizer`) are written beside them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from did_cli.errors import ModelLoadError, UsageError

# Named shapes for `did finetune --init`. `small` is the 110M BD3-LM/MDLM DiT; `tiny` is what fits CPU training.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_dim": 256, "cond_dim": 64, "n_blocks": 4, "n_heads": 4},
    "small": {"hidden_dim": 768, "cond_dim": 128, "n_blocks": 12, "n_heads": 12},
}


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
        tokenizer: a tokenizer id or folder to use when the checkpoint does not ship one.
        sampling_eps_min: lower end of the clipped noise interval the checkpoint was trained with (metadata).
        sampling_eps_max: upper end of that interval (metadata).
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
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mask_id is None:
            object.__setattr__(self, "mask_id", self.vocab_size - 1)
        if self.hidden_dim % self.n_heads:
            raise UsageError(f"hidden_dim {self.hidden_dim} is not a multiple of n_heads {self.n_heads}")
        if (self.hidden_dim // self.n_heads) % 2:
            raise UsageError("the head dimension must be even for rotary embeddings")
        if not 0 <= self.mask_id < self.vocab_size:
            raise UsageError(f"mask_id {self.mask_id} is outside the vocabulary of size {self.vocab_size}")
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

    def to_json_dict(self) -> dict[str, Any]:
        """The `config.json` body: BD3-LM's fields first, so BD3-LM tooling can read it."""
        body = {
            "architectures": ["BD3LM"],
            "model_type": "bd3lm",
            "attn_backend": "sdpa",
            "cross_attn": True,
            "adaln": True,
            "var_min": True,
            "return_dict": False,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"},
        }
        return {**self.extra, **body}

    @classmethod
    def from_json_dict(cls, body: dict[str, Any]) -> ModelConfig:
        """Read a BD3-LM or did `config.json`, keeping unknown fields in `extra` so a round trip loses nothing."""
        if body.get("model_type") not in ("bd3lm", None):
            raise ModelLoadError(f"config.json has model_type {body.get('model_type')!r}; expected 'bd3lm'")
        if body.get("adaln") is False:
            raise ModelLoadError("config.json sets adaln=false; did only runs BD3-LM's adaLN denoiser")
        if body.get("causal"):
            raise ModelLoadError("config.json sets causal=true (an autoregressive model); did needs a denoiser")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "vocab_size" not in body:
            raise ModelLoadError("config.json has no vocab_size")
        kwargs = {k: v for k, v in body.items() if k in known}
        extra = {k: v for k, v in body.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_preset(cls, preset: str, *, vocab_size: int, model_length: int, **overrides: Any) -> ModelConfig:
        """A fresh model shape: one of `PRESETS` with the tokenizer's vocabulary and the training length."""
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        shape = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(vocab_size=vocab_size, model_length=model_length, **shape)


UNMASKING_ORDERS = ("first-hitting", "steps", "confidence")
REMASK_STRATEGIES = ("snapshot", "posthoc", "random")


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
        top_p: nucleus mass; tokens are kept while the cumulative probability stays within it (BD3-LM's rule).
        temperature: softmax temperature applied before the nucleus filter.
    """

    order: str = "first-hitting"
    steps_per_block: int | None = None
    tokens_per_call: int = 1
    top_p: float = 0.9
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.order not in UNMASKING_ORDERS:
            raise UsageError(f"unknown unmasking order {self.order!r}; choose one of {', '.join(UNMASKING_ORDERS)}")
        if self.order == "steps" and (self.steps_per_block is None or self.steps_per_block < 1):
            raise UsageError("--steps-per-block must be a positive integer with the 'steps' order")
        if self.tokens_per_call < 1:
            raise UsageError(f"--tokens-per-call must be at least 1, got {self.tokens_per_call}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise UsageError(f"--temperature must be positive, got {self.temperature}")


@dataclass(frozen=True)
class DraftSettings:
    """Stage 1: semi-autoregressive drafting with block size B1 (`block_size`) over `length` tokens.

    `length` counts the whole sequence, BOS and prompt included, like BD3-LM's `model.length`.
    """

    length: int
    block_size: int = 4
    kv_cache: bool = True
    unmasking: UnmaskingSettings = field(default_factory=UnmaskingSettings)

    def __post_init__(self) -> None:
        if self.length < 2:
            raise UsageError(f"--length must be at least 2, got {self.length}")
        check_block_size(self.block_size, self.length)


@dataclass(frozen=True)
class RefineSettings:
    """Stage k > 1: remask the `gamma` fraction of generated tokens chosen by `remask`, re-denoise with B2.

    `block_size` None means one global block (the whole sequence, fully bidirectional), the paper's B2 = L.
    """

    gamma: float = 0.5
    block_size: int | None = None
    remask: str = "snapshot"
    kv_cache: bool = True
    unmasking: UnmaskingSettings = field(default_factory=UnmaskingSettings)

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise UsageError(f"--gamma must be in [0, 1], got {self.gamma}")
        if self.remask not in REMASK_STRATEGIES:
            raise UsageError(f"unknown remask strategy {self.remask!r}; choose one of {', '.join(REMASK_STRATEGIES)}")
        if self.block_size is not None and self.block_size < 1:
            raise UsageError(f"--block-size must be positive, got {self.block_size}")


def check_block_size(block_size: int, length: int) -> None:
    """A block size must divide the length, unless it covers the whole sequence (one global block)."""
    if block_size < 1:
        raise UsageError(f"block size must be positive, got {block_size}")
    if block_size < length and length % block_size:
        raise UsageError(f"block size {block_size} does not divide the length {length}")


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
        micro_batch_size: rows per forward pass per process.
        lr: peak learning rate (AdamW, betas 0.9/0.999, no weight decay).
        warmup: linear warmup steps; constant afterwards.
        seq_len: sequence length L (default: the model's length).
        save_every: checkpoint interval in steps.
        keep_last: checkpoints kept.
        resume: continue from the latest checkpoint in `out`.
        seed: seeds initialisation, data order, block-size draws and noise.
        clip: (eps_min, eps_max) interval for t, or such intervals per block size ({4: (0.5, 1.0)}).
        resample: redraw blocks whose masked fraction is outside `clip` (BD3-LM's training.resample).
        ema: EMA decay.
        grad_clip: gradient-norm clip.
        val_every: validation interval in steps (0 disables).
        val_batches: validation batches (of micro_batch_size rows) per evaluation.
        log_every: logging interval in steps.
        mixed_precision: `auto` (bf16 where supported on GPU, else none), `no`, `bf16` or `fp16`.
        cache_dir: where tokenised corpora are cached.
        num_proc: processes for tokenisation.
        report_to: accelerate trackers (e.g. tensorboard, wandb) besides metrics.jsonl.
        attn_backend: attention kernels: `auto` (flex attention on CUDA, SDPA elsewhere), `sdpa` or `flex`.
        compile: `torch.compile` the transformer blocks (one graph per block size).
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
    micro_batch_size: int = 16
    lr: float = 3e-4
    warmup: int = 2500
    seq_len: int | None = None
    save_every: int = 1000
    keep_last: int = 3
    resume: bool = False
    seed: int = 0
    clip: tuple[float, float] | dict[int, tuple[float, float]] = (1e-3, 1.0)
    resample: bool = True
    ema: float = 0.9999
    grad_clip: float = 1.0
    val_every: int = 1000
    val_batches: int = 8
    log_every: int = 10
    mixed_precision: str = "auto"
    cache_dir: str | None = None
    num_proc: int | None = None
    report_to: tuple[str, ...] = ()
    attn_backend: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "save_every": self.save_every,
            "keep_last": self.keep_last,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.lr <= 0 or self.warmup < 0 or self.val_every < 0 or self.grad_clip <= 0:
            raise UsageError("--lr and --grad-clip must be positive, --warmup and --val-every non-negative")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise UsageError(f"--mixed-precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.txt_documents not in ("lines", "file"):
            raise UsageError(f"--txt-documents must be lines or file, got {self.txt_documents!r}")
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            raise UsageError(f"--attn-backend must be auto, sdpa or flex, got {self.attn_backend!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")

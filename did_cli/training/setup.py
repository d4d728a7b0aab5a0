"""Setting a fine-tuning run up: accelerator, batch layout, resume point, model, data and optimizer, ready to step.

`set_up` turns `FinetuneSettings` into a `TrainingRun`, the state the loop steps (`training.loop`) and checkpoints
save and load (`training.checkpoint_io`). Design choices:

* `--batch-size` is the global batch per optimizer step. Rows, block sizes and noise are a function of (seed, step)
  and of the global row index only, so a run gives the same data and noise on 1 or 8 processes.
* The loss goes through a small wrapper module so data-parallel training calls the wrapper's `forward`, as DDP
  requires; the wrapped denoiser is what gets exported.
* Setting up takes a while (loading, tokenising), so it says what it is doing through `loading`, `reading` and
  `data` events (and a `note` when a corpus too small to hold out one sequence is trained without validation).
* The scheduler is stepped by hand rather than prepared: accelerate's prepared scheduler steps once per process,
  which would make warmup depend on the number of processes. It is a function of the step, so a checkpoint stores
  only its position and a resumed run rebuilds it from the current --lr and --warmup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from did_cli.checkpoints import load_model, load_tokenizer
from did_cli.config import ModelConfig
from did_cli.data import DataSpec, PackedRows, tokenize_corpus
from did_cli.errors import DataError, UsageError
from did_cli.execution import optimize
from did_cli.model import BD3LM
from did_cli.noise import AUTO_CLIP, BlockSizeMix, ClipSpec, parse_mix
from did_cli.processes import accelerator as make_accelerator
from did_cli.settings import FinetuneSettings, default_micro_batch_size
from did_cli.training import run_folder, state
from did_cli.training.clip_search import ClipState
from did_cli.training.ema import EMA
from did_cli.training.objective import nelbo_sum

__all__ = ["EventFn", "TrainingRun", "set_up", "step_seed"]

EventFn = Callable[[dict[str, Any]], None]


class Objective(nn.Module):
    """The NELBO as a module, so DDP sees a `forward` call; `denoiser` is the model being trained."""

    def __init__(self, denoiser: BD3LM) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(
        self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, block_size: int, weighted: bool = True
    ) -> torch.Tensor:
        """Summed NELBO terms of a micro-batch (see `training.objective.nelbo_sum`)."""
        return nelbo_sum(self.denoiser, clean, noisy, t, block_size, weighted=weighted)


def step_seed(seed: int, step: int, purpose: str) -> int:
    """The seed of one step's draw (`block`, `noise`, `valid`, ...): a function of (seed, step) alone."""
    digest = hashlib.sha256(f"did-train:{purpose}:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class TrainingRun:
    """Everything a run holds between steps (kept out of the model; dropped when the run ends).

    Attributes:
        settings: the run's settings, micro-batch size resolved.
        accelerator: accelerate's Accelerator.
        objective: the prepared (possibly DDP-wrapped) `Objective`.
        denoiser: the model being trained, unwrapped.
        optimizer: the prepared AdamW.
        scheduler: the LR schedule, stepped by hand.
        ema: the EMA of the weights (what is exported).
        mix: the block-size mix.
        train_rows: training rows.
        valid_rows: held-out rows.
        length: the row length L.
        rows_per_rank: rows each process takes per step.
        accumulation: micro-batches per step.
        tokenizer: the tokenizer exported with the weights.
        data: the corpus description for settings.json.
        emit: the event callback (main process only).
        warn: the warning callback (main process only).
        clip_state: `--clip auto`'s chosen intervals.
        overrides: allowed settings changes, with the step each began at.
        resume_from: the checkpoint the run continues, or None.
        saved: that checkpoint's JSON state.
    """

    settings: FinetuneSettings
    accelerator: Any
    objective: nn.Module
    denoiser: BD3LM
    optimizer: Any
    scheduler: Any
    ema: EMA
    mix: BlockSizeMix
    train_rows: PackedRows
    valid_rows: PackedRows
    length: int
    rows_per_rank: int
    accumulation: int
    tokenizer: Any
    data: dict[str, Any]
    emit: EventFn
    warn: Callable[[str], None]
    clip_state: ClipState = field(default_factory=ClipState)
    overrides: list[dict[str, Any]] = field(default_factory=list)
    resume_from: Path | None = None
    saved: dict[str, Any] | None = None

    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.settings.out)

    @property
    def world(self) -> int:
        """Processes training together."""
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        """This process's index."""
        return self.accelerator.process_index

    @property
    def main(self) -> bool:
        """Whether this is the main process (it writes the run folder's files)."""
        return self.accelerator.is_main_process

    @property
    def clip(self) -> ClipSpec:
        """The noise interval(s) in force: the fixed --clip, or what the last search chose (full interval before)."""
        return self.clip_state.intervals if self.settings.clip == AUTO_CLIP else self.settings.clip


def set_up(
    settings: FinetuneSettings, on_event: EventFn | None, allow_settings_change: bool, overwrite: bool
) -> TrainingRun:
    """The run `settings` describe, with its checkpoint chosen (resume) and everything built and prepared.

    Raises:
        UsageError: a layout the processes cannot split, an earlier run in the folder, settings that differ.
        DataError: too little data for one row.
    """
    from accelerate.utils import set_seed
    from transformers import get_constant_schedule_with_warmup

    accelerator = make_accelerator(
        mixed_precision=_precision(settings.mixed_precision),
        log_with=list(settings.report_to) or None,
        project_dir=str(settings.out),
    )
    main = accelerator.is_main_process
    emit = on_event if (on_event is not None and main) else (lambda event: None)

    def warn(message: str) -> None:
        if not main:
            return
        if on_event is None:
            warnings.warn(message, stacklevel=3)
        else:
            on_event({"event": "warning", "message": message})

    settings = _batch_layout(settings, accelerator)
    resume_from, saved, overrides = _resume_point(settings, accelerator, warn, allow_settings_change, overwrite)
    emit({"event": "loading", "model": settings.model if settings.init is None else None, "init": settings.init})
    model, tokenizer = _build_model(settings, settings.seq_len)
    optimize(
        model,
        attn_backend=settings.attn_backend,
        compile=settings.compile,
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    length = settings.seq_len or model.config.model_length
    if length > model.config.model_length:
        raise UsageError(f"--seq-len {length} exceeds the model's length {model.config.model_length}")
    mix = parse_mix(settings.mix, length)
    train_rows, valid_rows, data = _rows(settings, accelerator, tokenizer, length, emit)

    set_seed(settings.seed)  # dropout streams; data and noise come from (seed, step)
    objective = Objective(model)
    optimizer = torch.optim.AdamW(
        objective.parameters(), lr=settings.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    scheduler = get_constant_schedule_with_warmup(optimizer, settings.warmup)
    ema = EMA(model.parameters(), settings.ema)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    denoiser: BD3LM = accelerator.unwrap_model(objective).denoiser
    ema.shadow = [s.to(accelerator.device) for s in ema.shadow]
    if settings.clip == AUTO_CLIP and not (settings.val_every and settings.val_batches and valid_rows.num_rows):
        raise UsageError(
            "--clip auto searches the interval at each validation; set --val-every and --val-batches and keep data"
        )
    if settings.report_to:
        accelerator.init_trackers("did-finetune", config={k: str(v) for k, v in dataclasses.asdict(settings).items()})
    rows_per_rank = settings.batch_size // accelerator.num_processes
    return TrainingRun(
        settings=settings,
        accelerator=accelerator,
        objective=objective,
        denoiser=denoiser,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        mix=mix,
        train_rows=train_rows,
        valid_rows=valid_rows,
        length=length,
        rows_per_rank=rows_per_rank,
        accumulation=rows_per_rank // settings.micro_batch_size,  # type: ignore[operator]
        tokenizer=tokenizer,
        data=data,
        emit=emit,
        warn=warn,
        overrides=overrides,
        resume_from=resume_from,
        saved=saved,
    )


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _batch_layout(settings: FinetuneSettings, accelerator: Any) -> FinetuneSettings:
    """The settings with the micro-batch size resolved for this many processes; a layout they cannot split refused."""
    from accelerate import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UsageError("did finetune runs data-parallel (DDP) only; launch without DeepSpeed or FSDP")
    world = accelerator.num_processes
    if settings.batch_size % world:
        raise UsageError(f"--batch-size {settings.batch_size} must be a multiple of the number of processes ({world})")
    if settings.micro_batch_size is None:
        # Resolved here, where the number of processes is known, so settings.json records the size used.
        settings = dataclasses.replace(
            settings, micro_batch_size=default_micro_batch_size(settings.batch_size // world)
        )
    if settings.batch_size % (world * settings.micro_batch_size):
        raise UsageError(
            f"--batch-size {settings.batch_size} must be a multiple of processes ({world}) x --micro-batch-size "
            f"({settings.micro_batch_size})"
        )
    if settings.compile and settings.attn_backend == "flex" and accelerator.device.type == "cpu":
        raise UsageError("--compile with --attn-backend flex cannot train on the CPU (torch has no CPU flex backward)")
    return settings


def _resume_point(
    settings: FinetuneSettings,
    accelerator: Any,
    warn: Callable[[str], None],
    allow_settings_change: bool,
    overwrite: bool,
) -> tuple[Path | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """(checkpoint to continue, its JSON state, settings overrides): an earlier run refused unless resumed or replaced.

    Damaged checkpoints are moved aside with a warning, and the newest intact one is chosen.
    """
    out = Path(settings.out)
    main = accelerator.is_main_process
    if main:
        run_folder.clean_staging(out)  # we hold the lock: whatever is staged there was left by a killed run
    accelerator.wait_for_everyone()
    existing = run_folder.checkpoints(out)
    earlier = run_folder.earlier_run(out)
    if earlier and not settings.resume:
        if not overwrite:
            raise UsageError(
                f"{out} holds an earlier run ({', '.join(earlier)}); pass --resume to continue it, --overwrite to "
                "replace it, or choose another --out"
            )
        accelerator.wait_for_everyone()
        if main:
            run_folder.remove_earlier_run(out)
        existing = []
    resume_from, damaged = state.newest_intact(existing) if existing else (None, [])
    accelerator.wait_for_everyone()  # every process has chosen before damaged checkpoints are moved aside
    for bad, problem in damaged:
        aside = bad.with_name(f"damaged-{bad.name}")
        if main:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
        assert resume_from is not None
        warn(
            f"checkpoint {bad.name} is damaged ({problem}); moved it to {aside.name}, resuming from {resume_from.name}"
        )
    saved = state.read_state(resume_from) if resume_from is not None else None
    overrides: list[dict[str, Any]] = []
    if saved is not None:
        assert resume_from is not None
        if saved["step"] > settings.steps:
            raise UsageError(f"{out} already holds step {saved['step']}, past --steps {settings.steps}")
        changes = run_folder.check_settings(saved, settings, resume_from, allow_settings_change)
        overrides = saved.get("overrides", []) + changes
        for change in changes:
            warn(run_folder.describe_change(change))
    return resume_from, saved, overrides


def _build_model(settings: FinetuneSettings, length: int | None) -> tuple[BD3LM, Any]:
    torch.manual_seed(settings.seed)
    overrides = dict(settings.init_overrides)
    if settings.init is None:
        model = load_model(settings.model, device="cpu", dtype=torch.float32)
        tokenizer = load_tokenizer(model, settings.tokenizer)
        if "dropout" in overrides:
            model.config = dataclasses.replace(model.config, dropout=float(overrides["dropout"]))
            for block in model.backbone.blocks:
                block.dropout = model.config.dropout
        return model, tokenizer
    tokenizer = load_tokenizer(settings.tokenizer or "gpt2")
    config = ModelConfig.from_preset(
        settings.init,
        vocab_size=len(tokenizer) + 1,
        model_length=length or 1024,
        mask_id=len(tokenizer),
        tokenizer=settings.tokenizer,
        **overrides,
    )
    model = BD3LM(config)
    model.source = None
    return model, tokenizer


def _rows(
    settings: FinetuneSettings, accelerator: Any, tokenizer: Any, length: int, emit: EventFn
) -> tuple[PackedRows, PackedRows, dict[str, Any]]:
    """Training and validation rows (tokenised once, on the main process first), and the corpus description."""
    cache = Path(settings.cache_dir) if settings.cache_dir else None
    held_out = 0.0 if settings.valid_data else settings.val_fraction
    emit({"event": "reading", "data": settings.data, "valid_data": settings.valid_data})
    with accelerator.main_process_first():
        spec = DataSpec(
            settings.data,
            settings.data_config,
            settings.data_split,
            settings.text_field,
            settings.txt_documents,
            held_out,
        )
        corpus = tokenize_corpus(spec, tokenizer, cache, settings.num_proc)
        valid_tokens = corpus.valid
        if settings.valid_data:
            valid_spec = dataclasses.replace(spec, source=settings.valid_data, val_fraction=0.0)
            valid_tokens = tokenize_corpus(valid_spec, tokenizer, cache, settings.num_proc).train
    train_rows = PackedRows(corpus.train, length, settings.seed)
    valid_rows = PackedRows(valid_tokens, length, settings.seed)
    if train_rows.num_rows == 0:
        raise DataError(f"the training split has {corpus.train.size} tokens, fewer than one sequence of {length}")
    _check_validation(
        settings, valid_rows, int(valid_tokens.size), length, lambda text: emit({"event": "note", "message": text})
    )
    emit(
        {
            "event": "data",
            "train_rows": train_rows.num_rows,
            "train_tokens": int(corpus.train.size),
            "valid_rows": valid_rows.num_rows,
            "valid_tokens": int(valid_tokens.size),
            "length": length,
            "epochs": settings.steps * settings.batch_size / train_rows.num_rows,
        }
    )
    return train_rows, valid_rows, corpus.meta


def _check_validation(
    settings: FinetuneSettings, valid_rows: PackedRows, tokens: int, length: int, note: Callable[[str], None]
) -> None:
    """Refuse requested validation that cannot run (held-out text shorter than one sequence).

    Validation is requested by --valid-data or `require_validation` (the CLI's explicit --val-every or
    --val-fraction); otherwise a run too small to hold out a sequence trains without validation, with a note.
    """
    if valid_rows.num_rows or not settings.val_batches:
        return
    what = f"the validation split has {tokens} tokens, fewer than one sequence of {length}"
    if settings.valid_data:
        raise DataError(f"{what}; pass a longer --valid-data (or --val-batches 0 to train without validation)")
    if settings.require_validation:
        raise DataError(
            f"{what}; raise --val-fraction or pass --valid-data (or --val-batches 0 to train without validation)"
        )
    note(f"{what}: this run is not validated (--valid-data or a larger --val-fraction would validate it)")

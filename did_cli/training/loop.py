"""The accelerate training loop for mix-scale block-diffusion fine-tuning.

Design choices:

* `--batch-size` is the global batch per optimizer step. Rows, block sizes and noise are a function of (seed, step)
  and of the global row index only, so a run gives the same data and noise on 1 or 8 processes, and a resumed run
  continues exactly where it stopped (`state.py` restores weights, optimizer, scheduler, EMA and RNG states).
* The block size is drawn once per optimizer step from the mix, identically on every rank without communication.
* The loss goes through a small wrapper module so data-parallel training calls the wrapper's `forward`, as DDP
  requires; the wrapped denoiser is what gets exported.
* The scheduler is stepped by hand rather than prepared: accelerate's prepared scheduler steps once per process,
  which would make warmup depend on the number of processes. It is a function of the step, so a checkpoint stores
  only its position and a resumed run rebuilds it from the current --lr and --warmup.
* Checkpoints are written to a temporary folder with a manifest and renamed; a NaN or inf loss stops the run before
  anything is saved, so the last checkpoint on disk is always a good one. A resume verifies the manifest and falls
  back to the newest intact checkpoint. Nothing is loaded with pickle (see `state.py`).
* The run folder is locked for the whole run (`run_folder.py`); Ctrl-C stops after the current step and saves it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from did_cli.checkpoints import load_model, load_tokenizer, save_model
from did_cli.compile import optimize
from did_cli.config import FinetuneSettings, ModelConfig, default_micro_batch_size
from did_cli.data import DataSpec, PackedRows, tokenize_corpus
from did_cli.errors import DataError, ModelLoadError, TrainingDivergedError, UsageError
from did_cli.files import write_text_atomically
from did_cli.model import BD3LM
from did_cli.noise import AUTO_CLIP, BlockSizeMix, ClipSpec, clip_for, is_unweighted, parse_mix
from did_cli.provenance import versions
from did_cli.training import run_folder, state
from did_cli.training.clip_search import ClipState, block_losses, clip_candidates, search_clip
from did_cli.training.ema import EMA
from did_cli.training.objective import nelbo_sum, noise_batch, validation_nelbo

EventFn = Callable[[dict[str, Any]], None]
_CHECKPOINT = re.compile(r"^step_(\d+)$")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says truthfully what was saved and how to continue."""


class _Objective(nn.Module):
    """The NELBO as a module, so DDP sees a `forward` call; `denoiser` is the model being trained."""

    def __init__(self, denoiser: BD3LM) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(
        self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, block_size: int, weighted: bool = True
    ) -> torch.Tensor:
        return nelbo_sum(self.denoiser, clean, noisy, t, block_size, weighted=weighted)


@dataclass
class FinetuneResult:
    """Where the run's outputs are and how it ended."""

    out: Path
    final: Path
    steps: int
    last_loss: float
    validation: dict[int, float]
    replicas_in_sync: bool


def _step_seed(seed: int, step: int, purpose: str) -> int:
    digest = hashlib.sha256(f"did-train:{purpose}:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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


def _last_good(out: Path) -> str:
    kept = _checkpoints(out / "checkpoints")
    return f"; the last good checkpoint is {kept[-1][1]}" if kept else "; no checkpoint was saved yet"


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _check_validation(
    settings: FinetuneSettings, valid_rows: PackedRows, tokens: int, length: int, warn: Callable[[str], None]
) -> None:
    """Refuse requested validation that cannot run (held-out text shorter than one sequence).

    Warn instead when only the end-of-run validation would have run.
    """
    if valid_rows.num_rows or not settings.val_batches:
        return
    what = f"the validation split has {tokens} tokens, fewer than one sequence of {length}"
    if settings.valid_data:
        raise DataError(f"{what}; pass a longer --valid-data")
    if settings.val_every:
        raise DataError(f"{what}; raise --val-fraction, pass --valid-data, or pass --val-every 0 to skip validation")
    warn(f"{what}: this run is not validated")


def _warn_if_frozen(settings: FinetuneSettings, ema: EMA, start: int, warn: Callable[[str], None]) -> None:
    """Warn when the run cannot move the exported (EMA) weights much: warmup past the end, or a slow EMA."""
    remaining = settings.steps - start
    if remaining <= 0:
        return
    if settings.warmup > settings.steps:
        warn(
            f"--warmup {settings.warmup} is longer than --steps {settings.steps}: the learning rate reaches only "
            f"{settings.steps / settings.warmup:.1%} of --lr {settings.lr:g}"
        )
    kept = ema.kept_fraction(remaining)
    if kept > 0.99:
        warn(
            f"--ema {ema.decay:g} after {ema.num_updates} updates keeps {kept:.2%} of the current average over the "
            f"remaining {remaining} steps: the exported weights will barely change; lower --ema"
        )


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.exists():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def finetune(
    settings: FinetuneSettings,
    on_event: EventFn | None = None,
    *,
    allow_settings_change: bool = False,
    overwrite: bool = False,
) -> FinetuneResult:
    """Run (or resume) a fine-tuning run and export the EMA weights to `OUT/final`.

    Args:
        settings: the run.
        on_event: called on the main process with each log, validation, checkpoint and warning event (the CLI prints
            them); without it, warnings go through `warnings.warn`.
        allow_settings_change: resume although settings that shape training differ from the checkpoint's; the
            changes are recorded in settings.json with the step they began at.
        overwrite: let a fresh run replace an earlier run's outputs in `settings.out`.

    Returns:
        A FinetuneResult.

    Raises:
        UsageError: another run holds the folder, it holds an earlier run (fresh run), or settings differ (resume).
        ModelLoadError: `--resume` found checkpoints but none of them is intact.
        TrainingInterrupted: Ctrl-C; the run first finishes and saves the step it is in.
    """
    out = Path(settings.out)
    with run_folder.locked(out, take=run_folder.is_main_rank()):
        try:
            return _finetune(settings, on_event, allow_settings_change, overwrite)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(_interrupted_message(out)) from None


def _interrupted_message(out: Path) -> str:
    """What a Ctrl-C outside the save-then-stop path leaves: the newest checkpoint on disk, or none."""
    kept = _checkpoints(out / "checkpoints")
    if not kept:
        return "interrupted; nothing was saved (no checkpoint exists yet)"
    return f"interrupted; the newest checkpoint is {kept[-1][1]}: continue from it with --resume"


def _finetune(
    settings: FinetuneSettings, on_event: EventFn | None, allow_settings_change: bool, overwrite: bool
) -> FinetuneResult:
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import set_seed
    from transformers import get_constant_schedule_with_warmup

    out = Path(settings.out)
    # Without a GPU, accelerate only forms a multi-process (gloo) group when told to run on the CPU; doing so
    # whenever several processes were launched makes `accelerate launch --multi_gpu` and torchrun work on CPUs too.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_process and not torch.cuda.is_available(),
        mixed_precision=_precision(settings.mixed_precision),
        log_with=list(settings.report_to) or None,
        project_dir=str(out),
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

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UsageError("did finetune runs data-parallel (DDP) only; launch without DeepSpeed or FSDP")
    world, rank = accelerator.num_processes, accelerator.process_index
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
    rows_per_rank = settings.batch_size // world
    accumulation = rows_per_rank // settings.micro_batch_size

    checkpoint_dir = out / "checkpoints"
    if main:
        run_folder.clean_staging(out)  # we hold the lock: whatever is staged there was left by a killed run
    accelerator.wait_for_everyone()
    existing = _checkpoints(checkpoint_dir)
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
        warn(
            f"checkpoint {bad.name} is damaged ({problem}); moved it to {aside.name}, resuming from {resume_from.name}"
        )
    saved = state.read_state(resume_from) if resume_from is not None else None
    overrides: list[dict[str, Any]] = []
    if saved is not None:
        if saved["step"] > settings.steps:
            raise UsageError(f"{out} already holds step {saved['step']}, past --steps {settings.steps}")
        changes = run_folder.check_settings(saved, settings, resume_from, allow_settings_change)
        overrides = saved.get("overrides", []) + changes
        for change in changes:
            warn(
                f"{run_folder.flag(change['setting'])} changes from {json.dumps(change['from'])} to "
                f"{json.dumps(change['to'])} at step {change['step']}"
            )

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
    cache = Path(settings.cache_dir) if settings.cache_dir else None
    held_out = 0.0 if settings.valid_data else settings.val_fraction
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
    _check_validation(settings, valid_rows, int(valid_tokens.size), length, warn)

    set_seed(settings.seed)  # dropout streams; data and noise come from (seed, step) below
    objective = _Objective(model)
    optimizer = torch.optim.AdamW(
        objective.parameters(), lr=settings.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    scheduler = get_constant_schedule_with_warmup(optimizer, settings.warmup)
    ema = EMA(model.parameters(), settings.ema)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    denoiser: BD3LM = accelerator.unwrap_model(objective).denoiser
    ema.shadow = [s.to(accelerator.device) for s in ema.shadow]
    clip_state = ClipState()
    if settings.clip == AUTO_CLIP and not (settings.val_every and valid_rows.num_rows):
        raise UsageError("--clip auto searches the interval at each validation; set --val-every and keep data")
    if settings.report_to:
        accelerator.init_trackers("did-finetune", config={k: str(v) for k, v in dataclasses.asdict(settings).items()})

    run = _Run(
        settings,
        accelerator,
        objective,
        denoiser,
        optimizer,
        scheduler,
        ema,
        mix,
        train_rows,
        valid_rows,
        length,
        rows_per_rank,
        accumulation,
        rank,
        emit,
        clip_state,
    )
    run.overrides = overrides
    start = 0
    if resume_from is not None and saved is not None:
        start = run.load(resume_from, saved)
        if saved.get("processes", world) != world:
            warn(f"resuming on {world} processes a run saved on {saved['processes']}: dropout streams differ")
        emit({"event": "resume", "step": start, "checkpoint": str(resume_from)})
    elif settings.resume:
        emit({"event": "fresh", "reason": f"no checkpoint in {checkpoint_dir}; starting at step 0"})
    _warn_if_frozen(settings, ema, start, warn)
    if main:
        if settings.resume:
            run_folder.drop_metrics_after(out / "metrics.jsonl", start)
        record = {
            "settings": dataclasses.asdict(settings),
            "overrides": overrides,
            "resumed_from": start if resume_from is not None else None,
            "versions": versions(),
            "processes": world,
            "data": corpus.meta,
        }
        write_text_atomically(out / "settings.json", json.dumps(record, indent=2, default=str) + "\n")
    last_loss = run.train(start)
    validation = run.validate(settings.steps) if valid_rows.num_rows and settings.val_batches else {}
    if not any(step == settings.steps for step, _ in _checkpoints(checkpoint_dir)):
        run.save(settings.steps)
    in_sync = run.replicas_in_sync()
    final = out / "final"
    if accelerator.is_main_process:
        # Record how the exported weights were trained; BD3-LM's `block_size` field keeps the smallest size.
        # The noise interval goes where BD3-LM keeps it: the config fields and the sampling_eps_min/max buffers.
        # Per-size intervals: the config fields take the smallest block size's, the full map goes to `extra`.
        eps_min, eps_max = clip_for(run.clip, mix.sizes[0], length)
        clips = {str(size): list(clip_for(run.clip, size, length)) for size in mix.sizes}
        denoiser.config = dataclasses.replace(
            denoiser.config,
            block_size=mix.sizes[0],
            sampling_eps_min=eps_min,
            sampling_eps_max=eps_max,
            extra={**denoiser.config.extra, "did_training_mix": mix.spec, "did_training_clip": clips},
        )
        denoiser.sampling_eps_min.fill_(eps_min)
        denoiser.sampling_eps_max.fill_(eps_max)
        with ema.swapped_in(denoiser):
            save_model(denoiser, final, tokenizer)
        summary = {
            "steps": settings.steps,
            "last_loss": last_loss,
            "validation_nelbo": validation,
            "replicas_in_sync": in_sync,
            "processes": world,
            "final": str(final),
        }
        write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        emit({"event": "done", **summary})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return FinetuneResult(out, final, settings.steps, last_loss, validation, in_sync)


class _Run:
    """The state of one training run between steps (kept out of the model; dropped when the run ends)."""

    def __init__(
        self,
        settings: FinetuneSettings,
        accelerator: Any,
        objective: nn.Module,
        denoiser: BD3LM,
        optimizer: Any,
        scheduler: Any,
        ema: EMA,
        mix: BlockSizeMix,
        train_rows: PackedRows,
        valid_rows: PackedRows,
        length: int,
        rows_per_rank: int,
        accumulation: int,
        rank: int,
        emit: EventFn,
        clip_state: ClipState,
    ) -> None:
        self.settings, self.accelerator, self.objective, self.denoiser = settings, accelerator, objective, denoiser
        self.optimizer, self.scheduler, self.ema, self.mix = optimizer, scheduler, ema, mix
        self.train_rows, self.valid_rows, self.length = train_rows, valid_rows, length
        self.rows_per_rank, self.accumulation, self.rank, self.emit = rows_per_rank, accumulation, rank, emit
        self.out = Path(settings.out)
        self.metrics = self.out / "metrics.jsonl"
        self.clip_state = clip_state

    @property
    def clip(self) -> ClipSpec:
        """The noise interval(s) in force: the fixed --clip, or what the last search chose (full interval before)."""
        return self.clip_state.intervals if self.settings.clip == AUTO_CLIP else self.settings.clip
        self.overrides: list[dict[str, Any]] = []  # allowed settings changes, with the step each began at

    def _batch(self, step: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows, x_t and per-token t for a step: noise for the global batch, then this rank's slice."""
        settings = self.settings
        clean = self.train_rows.batch(step * settings.batch_size, settings.batch_size)
        generator = torch.Generator().manual_seed(_step_seed(settings.seed, step, "noise"))
        interval = clip_for(self.clip, block_size, self.length)
        noisy, t_token = noise_batch(
            clean, block_size, self.denoiser.mask_id, generator, interval, resample=settings.resample
        )
        # Interleaved rows: t is stratified along the batch, so contiguous slices would give one rank all the
        # heavily masked rows (and most of the vocabulary projections); every rank gets an even spread instead.
        rows = slice(self.rank, None, self.settings.batch_size // self.rows_per_rank)
        device = self.accelerator.device
        return clean[rows].to(device), noisy[rows].to(device), t_token[rows].to(device)

    def train(self, start: int) -> float:
        """Optimizer steps from `start` to `settings.steps`; returns the last step's loss.

        Raises:
            TrainingInterrupted: after Ctrl-C, once the current step is finished and saved.
        """
        with _StopRequest(self.emit) as stop:
            return self._train(start, stop)

    def _train(self, start: int, stop: _StopRequest) -> float:
        settings, accelerator = self.settings, self.accelerator
        self.objective.train()
        window: dict[int, list[float]] = {}
        tic, tokens_since, last_loss = time.perf_counter(), 0, float("nan")
        run_start, saved_at = tic, -1
        for step in range(start, settings.steps):
            block_size = self.mix.draw(torch.Generator().manual_seed(_step_seed(settings.seed, step, "block")))
            clean, noisy, t = self._batch(step, block_size)
            weighted = not is_unweighted(clip_for(self.clip, block_size, self.length)[0])
            normaliser = self.rows_per_rank * self.length
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(self.accumulation):
                rows = slice(micro * settings.micro_batch_size, (micro + 1) * settings.micro_batch_size)
                last_micro = micro == self.accumulation - 1
                context = accelerator.no_sync(self.objective) if not last_micro else nullcontext()
                with context:
                    loss = self.objective(clean[rows], noisy[rows], t[rows], block_size, weighted) / normaliser
                    accelerator.backward(loss)
                step_loss += loss.detach()
            step_loss = accelerator.reduce(step_loss, reduction="mean")
            last_loss = float(step_loss)
            if not math.isfinite(last_loss):
                raise TrainingDivergedError(
                    f"the loss became {last_loss} at step {step + 1} (block size {block_size})" + _last_good(self.out)
                )
            grad_norm = accelerator.clip_grad_norm_(self.objective.parameters(), settings.grad_clip)
            if grad_norm is not None and not math.isfinite(float(grad_norm)):
                # Gradients are all-reduced, so every rank sees the same norm and stops together, before the step
                # that would poison the weights, the EMA and the next checkpoint.
                raise TrainingDivergedError(
                    f"the gradient norm became {float(grad_norm)} at step {step + 1} (block size {block_size})"
                    + _last_good(self.out)
                )
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.denoiser.parameters())
            window.setdefault(block_size, []).append(last_loss)
            tokens_since += settings.batch_size * self.length
            done = step + 1
            if done % settings.log_every == 0 or done == settings.steps:
                now = time.perf_counter()
                rate = tokens_since / max(now - tic, 1e-9)
                steps_per_s = (done - start) / max(now - run_start, 1e-9)
                self._log(
                    {
                        "event": "train",
                        "step": done,
                        "loss": last_loss,
                        "block_size": block_size,
                        "loss_by_block_size": {str(k): sum(v) / len(v) for k, v in sorted(window.items())},
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": rate,
                        "eta_s": (settings.steps - done) / max(steps_per_s, 1e-9),
                    }
                )
                window, tic, tokens_since = {}, now, 0
            if settings.val_every and done % settings.val_every == 0 and done != settings.steps:
                self.validate(done)
                tic = time.perf_counter()  # throughput counts training time only
            if done % settings.save_every == 0 and done != settings.steps:
                self.save(done)
                saved_at, tic = done, time.perf_counter()
            if self._stop_requested(stop):
                target = self.save(done) if saved_at != done else self.out / "checkpoints" / f"step_{done:08d}"
                raise TrainingInterrupted(f"interrupted: saved step {done} to {target}; continue with --resume")
        return last_loss

    def _stop_requested(self, stop: _StopRequest) -> bool:
        """Whether any process saw Ctrl-C (all processes agree, so they save and stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return stop.requested
        votes = torch.tensor(float(stop.requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(votes, reduction="sum").item() > 0)

    def validate(self, step: int) -> dict[int, float]:
        """NELBO per block size of the mix on held-out rows, with the EMA weights (main process only)."""
        results: dict[int, float] = {}
        if self.valid_rows.num_rows and self.accelerator.is_main_process:
            model = self.denoiser
            was_training = model.training
            model.eval()
            with self.ema.swapped_in(model):
                for size in self.mix.sizes:
                    total = 0.0
                    batches = 0
                    for index in range(self.settings.val_batches):
                        first = index * self.settings.micro_batch_size
                        if first >= self.valid_rows.num_rows:
                            break
                        clean = self.valid_rows.sequential(first, self.settings.micro_batch_size)
                        generator = torch.Generator().manual_seed(_step_seed(self.settings.seed, index, "valid"))
                        with self.accelerator.autocast():
                            total += validation_nelbo(model, clean.to(self.accelerator.device), size, generator)
                        batches += 1
                    results[size] = total / batches
                if self.settings.clip == AUTO_CLIP:
                    self._search_clip(step)
            model.train(was_training)
            self._log({"event": "validation", "step": step, "nelbo": {str(k): v for k, v in results.items()}})
        if self.settings.clip == AUTO_CLIP and self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = broadcast_object_list([self.clip_state.intervals])
            self.clip_state.intervals = shared[0]
        self.accelerator.wait_for_everyone()
        return results

    def _search_clip(self, step: int) -> None:
        """`--clip auto`: per block size above 1, the lowest-variance interval on the validation batches."""
        settings, device = self.settings, self.accelerator.device
        batches = [
            self.valid_rows.sequential(index * settings.micro_batch_size, settings.micro_batch_size)
            for index in range(settings.val_batches)
            if index * settings.micro_batch_size < self.valid_rows.num_rows
        ]
        for size in (s for s in self.mix.sizes if s > 1):

            def losses_for(interval: tuple[float, float], size: int = size) -> list[torch.Tensor]:
                out = []
                for index, clean in enumerate(batches):
                    generator = torch.Generator().manual_seed(_step_seed(settings.seed, index, f"clip:{size}"))
                    with self.accelerator.autocast():
                        out.append(block_losses(self.denoiser, clean.to(device), size, interval, generator))
                return out

            chosen, variances = search_clip(clip_candidates(), losses_for)
            self.clip_state.intervals[size] = chosen
            self._log(
                {"event": "clip_search", "step": step, "block_size": size, "clip": list(chosen), "variance": variances}
            )

    def save(self, step: int) -> Path:
        """Write a full training state for `step` atomically, with its manifest, and keep the last `keep_last`."""
        folder = self.out / "checkpoints"
        staging = folder / f".tmp-step_{step:08d}"
        target = folder / f"step_{step:08d}"
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        state.save_rng(staging / state.rng_file(self.rank), state.capture_rng())
        if main:
            self._write_state(staging, step)
        self.accelerator.wait_for_everyone()
        if main:
            state.write_manifest(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
            for _, old in _checkpoints(folder)[: -self.settings.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            self.emit({"event": "checkpoint", "step": step, "path": str(target)})
        self.accelerator.wait_for_everyone()
        return target

    def _write_state(self, staging: Path, step: int) -> None:
        """Weights, optimizer, EMA (safetensors) and the rest (JSON) of the main process."""
        module = self.accelerator.unwrap_model(self.objective)
        state.save_tensors(staging / state.MODEL, module.state_dict(), {"format": "pt"})
        tensors, rest = state.split_optimizer_state(self.optimizer.state_dict())
        state.save_tensors(staging / state.OPTIMIZER, tensors)
        names = [name for name, _ in self.denoiser.named_parameters()]
        state.save_tensors(staging / state.EMA_WEIGHTS, dict(zip(names, self.ema.shadow, strict=True)))
        scaler = self.accelerator.scaler
        record = {
            "format": state.FORMAT,
            "step": step,
            "processes": self.accelerator.num_processes,
            "scheduler": {"last_epoch": self.scheduler.last_epoch},
            "optimizer": rest,
            "ema": {"decay": self.ema.decay, "num_updates": self.ema.num_updates},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "settings": json.loads(json.dumps(dataclasses.asdict(self.settings), default=str)),
            "overrides": self.overrides,
            "clip_search": self.clip_state.state_dict(),  # --clip auto's choices, kept across --resume
        }
        (staging / state.STATE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")

    def load(self, folder: Path, saved: dict[str, Any]) -> int:
        """Restore the state `save` wrote into `folder` (its JSON part already read as `saved`); returns its step.

        The EMA decay, learning rate and warmup come from this run's settings: the schedule is a function of the
        step, so it is rebuilt at the saved position (a changed --lr or --warmup therefore takes effect).
        """
        try:
            self._load(folder, saved)
        except (RuntimeError, KeyError, ValueError, TypeError, OSError, SafetensorError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{folder} does not fit this run or is unreadable: {first_line}") from None
        return int(saved["step"])

    def _load(self, folder: Path, saved: dict[str, Any]) -> None:
        module = self.accelerator.unwrap_model(self.objective)
        module.load_state_dict(state.load_tensors(folder / state.MODEL), strict=True)
        tensors = state.load_tensors(folder / state.OPTIMIZER)
        self.optimizer.load_state_dict(state.join_optimizer_state(tensors, saved["optimizer"]))
        shadows = state.load_tensors(folder / state.EMA_WEIGHTS)
        names = [name for name, _ in self.denoiser.named_parameters()]
        self.ema.shadow = [shadows[n].to(s.device, s.dtype) for n, s in zip(names, self.ema.shadow, strict=True)]
        self.ema.num_updates = int(saved["ema"]["num_updates"])
        last_epoch = int(saved["scheduler"]["last_epoch"])
        groups = self.optimizer.param_groups
        self.scheduler.base_lrs = [self.settings.lr for _ in groups]
        lambdas = self.scheduler.lr_lambdas
        lrs = [base * fn(last_epoch) for fn, base in zip(lambdas, self.scheduler.base_lrs, strict=True)]
        for group, lr in zip(groups, lrs, strict=True):
            group["initial_lr"], group["lr"] = self.settings.lr, lr
        scheduler_state = self.scheduler.state_dict() | {"last_epoch": last_epoch, "_last_lr": lrs}
        self.scheduler.load_state_dict(scheduler_state | {"_step_count": last_epoch + 1})
        if saved.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        if saved.get("clip_search"):
            self.clip_state.load_state_dict(saved["clip_search"])
        rng = folder / state.rng_file(self.rank)
        if rng.exists():  # a process that did not exist when the checkpoint was saved keeps its seeded streams
            state.restore_rng(rng)

    def replicas_in_sync(self) -> bool:
        """Whether every process holds identical weights (a cheap checksum gathered from each rank)."""
        with torch.no_grad():
            checksum = sum(p.double().sum() * (i + 1) for i, p in enumerate(self.denoiser.parameters()))
        gathered = self.accelerator.gather(checksum.reshape(1).to(self.accelerator.device)).cpu()
        return bool((gathered == gathered[0]).all())

    def _log(self, event: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.metrics, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")
            self.emit(event)
            numbers = {k: v for k, v in event.items() if isinstance(v, int | float) and k != "step"}
            if self.settings.report_to:
                self.accelerator.log(numbers, step=event["step"])


class _StopRequest:
    """Ctrl-C handling while training.

    The first Ctrl-C asks the loop to stop after the current step (and save it); a second one interrupts at once,
    saving nothing.
    """

    def __init__(self, emit: EventFn) -> None:
        self.requested = False
        self.emit = emit
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread, where Ctrl-C cannot arrive anyway
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.emit({"event": "stopping"})

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

"""The accelerate training loop for mix-scale block-diffusion fine-tuning.

Design choices:

* `--batch-size` is the global batch per optimizer step. Rows, block sizes and noise are a function of (seed, step)
  and of the global row index only, so a run gives the same data and noise on 1 or 8 processes, and a resumed run
  continues exactly where it stopped (accelerate restores weights, optimizer, scheduler, EMA and RNG states).
* The block size is drawn once per optimizer step from the mix, identically on every rank without communication.
* The loss goes through a small wrapper module so data-parallel training calls the wrapper's `forward`, as DDP
  requires; the wrapped denoiser is what gets exported.
* The scheduler is stepped by hand and registered for checkpointing rather than prepared: accelerate's prepared
  scheduler steps once per process, which would make warmup depend on the number of processes.
* Checkpoints are written to a temporary folder and renamed; a NaN or inf loss stops the run before anything is
  saved, so the last checkpoint on disk is always a good one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from did_cli.checkpoints import load_model, load_tokenizer, save_model
from did_cli.compile import optimize
from did_cli.config import FinetuneSettings, ModelConfig
from did_cli.data import DataSpec, PackedRows, tokenize_corpus
from did_cli.errors import DataError, TrainingDivergedError, UsageError
from did_cli.model import BD3LM
from did_cli.noise import BlockSizeMix, clip_for, mask_tokens, parse_mix, sample_t
from did_cli.provenance import versions
from did_cli.training.ema import EMA
from did_cli.training.objective import nelbo_sum, validation_nelbo

EventFn = Callable[[dict[str, Any]], None]
_CHECKPOINT = re.compile(r"^step_(\d+)$")


class _Objective(nn.Module):
    """The NELBO as a module, so DDP sees a `forward` call; `denoiser` is the model being trained."""

    def __init__(self, denoiser: BD3LM) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, block_size: int) -> torch.Tensor:
        return nelbo_sum(self.denoiser, clean, noisy, t, block_size)


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


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.exists():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def finetune(settings: FinetuneSettings, on_event: EventFn | None = None) -> FinetuneResult:
    """Run (or resume) a fine-tuning run and export the EMA weights to `OUT/final`.

    Args:
        settings: the run.
        on_event: called on the main process with each log, validation and checkpoint event (the CLI prints them).

    Returns:
        A FinetuneResult.
    """
    from accelerate import Accelerator
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
    emit = on_event if (on_event is not None and accelerator.is_main_process) else (lambda event: None)
    world, rank = accelerator.num_processes, accelerator.process_index
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
    existing = _checkpoints(checkpoint_dir)
    if existing and not settings.resume:
        raise UsageError(f"{out} already holds checkpoints; pass --resume to continue or choose another --out")

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
    accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(scheduler)
    if settings.report_to:
        accelerator.init_trackers("did-finetune", config={k: str(v) for k, v in dataclasses.asdict(settings).items()})

    start = 0
    if existing and existing[-1][0] > settings.steps:
        raise UsageError(f"{out} already holds step {existing[-1][0]}, past --steps {settings.steps}")
    if existing:
        step_done, folder = existing[-1]
        accelerator.load_state(str(folder))
        start = step_done
        emit({"event": "resume", "step": start, "checkpoint": str(folder)})
    elif settings.resume:
        emit({"event": "fresh", "reason": f"no checkpoint in {checkpoint_dir}; starting at step 0"})

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
    )
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (out / "settings.json").write_text(
            json.dumps(
                {
                    "settings": dataclasses.asdict(settings),
                    "versions": versions(),
                    "processes": world,
                    "data": corpus.meta,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
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
        eps_min, eps_max = clip_for(settings.clip, mix.sizes[0], length)
        clips = {str(size): list(clip_for(settings.clip, size, length)) for size in mix.sizes}
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
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
    ) -> None:
        self.settings, self.accelerator, self.objective, self.denoiser = settings, accelerator, objective, denoiser
        self.optimizer, self.scheduler, self.ema, self.mix = optimizer, scheduler, ema, mix
        self.train_rows, self.valid_rows, self.length = train_rows, valid_rows, length
        self.rows_per_rank, self.accumulation, self.rank, self.emit = rows_per_rank, accumulation, rank, emit
        self.out = Path(settings.out)
        self.metrics = self.out / "metrics.jsonl"

    def _batch(self, step: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows, x_t and per-token t for a step: noise for the global batch, then this rank's slice."""
        settings = self.settings
        clean = self.train_rows.batch(step * settings.batch_size, settings.batch_size)
        generator = torch.Generator().manual_seed(_step_seed(settings.seed, step, "noise"))
        eps_min, eps_max = clip_for(settings.clip, block_size, self.length)
        t = sample_t(settings.batch_size, self.length // block_size, generator, eps_min, eps_max)
        noisy, t_token = mask_tokens(
            clean,
            t,
            block_size,
            self.denoiser.mask_id,
            generator,
            resample=settings.resample,
            eps_min=eps_min,
            eps_max=eps_max,
        )
        # Interleaved rows: t is stratified along the batch, so contiguous slices would give one rank all the
        # heavily masked rows (and most of the vocabulary projections); every rank gets an even spread instead.
        rows = slice(self.rank, None, self.settings.batch_size // self.rows_per_rank)
        device = self.accelerator.device
        return clean[rows].to(device), noisy[rows].to(device), t_token[rows].to(device)

    def train(self, start: int) -> float:
        """Optimizer steps from `start` to `settings.steps`; returns the last step's loss."""
        settings, accelerator = self.settings, self.accelerator
        self.objective.train()
        window: dict[int, list[float]] = {}
        tic, tokens_since, last_loss = time.perf_counter(), 0, float("nan")
        run_start = tic
        for step in range(start, settings.steps):
            block_size = self.mix.draw(torch.Generator().manual_seed(_step_seed(settings.seed, step, "block")))
            clean, noisy, t = self._batch(step, block_size)
            normaliser = self.rows_per_rank * self.length
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(self.accumulation):
                rows = slice(micro * settings.micro_batch_size, (micro + 1) * settings.micro_batch_size)
                last_micro = micro == self.accumulation - 1
                context = accelerator.no_sync(self.objective) if not last_micro else nullcontext()
                with context:
                    loss = self.objective(clean[rows], noisy[rows], t[rows], block_size) / normaliser
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
                tic = time.perf_counter()
        return last_loss

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
            model.train(was_training)
            self._log({"event": "validation", "step": step, "nelbo": {str(k): v for k, v in results.items()}})
        self.accelerator.wait_for_everyone()
        return results

    def save(self, step: int) -> None:
        """Write a full training state for `step` atomically and keep the last `keep_last`."""
        folder = self.out / "checkpoints"
        staging = folder / f".tmp-step_{step:08d}"
        target = folder / f"step_{step:08d}"
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (staging / "training_state.json").write_text(json.dumps({"step": step}) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
            for _, old in _checkpoints(folder)[: -self.settings.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            self.emit({"event": "checkpoint", "step": step, "path": str(target)})
        self.accelerator.wait_for_everyone()

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

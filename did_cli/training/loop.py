"""The accelerate training loop for mix-scale block-diffusion fine-tuning: steps, validation, the exported weights.

Design choices:

* The block size is drawn once per optimizer step from the mix, identically on every rank without communication;
  rows and noise of a step are a function of (seed, step), so a resumed run continues exactly where it stopped
  (`training.checkpoint_io` restores weights, optimizer, scheduler, EMA and RNG states).
* A NaN or inf loss (or gradient norm) stops the run before anything is saved, so the last checkpoint on disk is
  always a good one; Ctrl-C stops after the current step and saves it; a save that fails (a full disk) names the
  file and the last good checkpoint.
* Events go to `on_event` as the run starts (model, data, rows and tokens, the step plan and where outputs go), then
  per log interval, validation and checkpoint; validation is `training.validation`'s token-weighted NELBO.
* The run folder is locked for the whole run (`did_cli.locks`); setting the run up is `training.setup`'s job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from did_cli.checkpoints import save_model
from did_cli.errors import TrainingDivergedError
from did_cli.files import write_text_atomically
from did_cli.hub import write_card
from did_cli.locks import locked_folder
from did_cli.noise import AUTO_CLIP, clip_for, is_unweighted
from did_cli.processes import launch
from did_cli.provenance import versions
from did_cli.settings import FinetuneSettings
from did_cli.training import checkpoint_io, run_folder
from did_cli.training.clip_search import block_losses, clip_candidates, search_clip
from did_cli.training.objective import noise_batch
from did_cli.training.setup import EventFn, TrainingRun, set_up, step_seed
from did_cli.training.validation import VALIDATION_BATCH_ROWS, batch_generator, held_out_nelbo, validation_batches

__all__ = ["FinetuneResult", "TrainingInterrupted", "finetune"]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says truthfully what was saved and how to continue."""


@dataclass
class FinetuneResult:
    """Where the run's outputs are and how it ended."""

    out: Path
    final: Path
    steps: int
    last_loss: float
    validation: dict[int, float]
    replicas_in_sync: bool


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
        on_event: called on the main process with each event (the CLI prints them): as the run starts `loading`,
            `reading`, `data` (rows and tokens) and `start` (the step plan and where outputs go), then `train`,
            `validation`, `checkpoint`, `note` and `warning`; without it, warnings go through `warnings.warn`.
        allow_settings_change: resume although settings that shape training differ from the checkpoint's; the
            changes are recorded in settings.json with the step they began at.
        overwrite: let a fresh run replace an earlier run's outputs in `settings.out`.

    Returns:
        A FinetuneResult.

    Raises:
        UsageError: another run holds the folder, it holds an earlier run (fresh run), or settings differ (resume).
        ModelLoadError: `--resume` found checkpoints but none of them is intact.
        DataError: validation was required (`require_validation` or `valid_data`) but cannot run.
        OutputError: a checkpoint or the final weights could not be written (the message names the file and the
            last good checkpoint).
        TrainingInterrupted: Ctrl-C; the run first finishes and saves the step it is in.
    """
    out = Path(settings.out)
    with locked_folder(out, take=launch().is_main):
        try:
            return _finetune(set_up(settings, on_event, allow_settings_change, overwrite))
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(checkpoint_io.interrupted_message(out)) from None


def _finetune(run: TrainingRun) -> FinetuneResult:
    settings, out = run.settings, run.out
    start = 0
    if run.resume_from is not None and run.saved is not None:
        start = checkpoint_io.load(run, run.resume_from, run.saved)
        if run.saved.get("processes", run.world) != run.world:
            run.warn(
                f"resuming on {run.world} processes a run saved on {run.saved['processes']}: dropout streams differ"
            )
        run.emit({"event": "resume", "step": start, "checkpoint": str(run.resume_from)})
    elif settings.resume:
        run.emit({"event": "fresh", "reason": f"no checkpoint in {out / 'checkpoints'}; starting at step 0"})
    _warn_if_frozen(run, start)
    if run.main:
        if settings.resume:
            run_folder.drop_metrics_after(out / "metrics.jsonl", start)
        record = {
            "settings": dataclasses.asdict(settings),
            "overrides": run.overrides,
            "resumed_from": start if run.resume_from is not None else None,
            "versions": versions(),
            "processes": run.world,
            "data": run.data,
        }
        write_text_atomically(out / "settings.json", json.dumps(record, indent=2, default=str) + "\n")
    run.emit(_start_event(run, start))
    trainer = Trainer(run)
    last_loss = trainer.train(start)
    validation = trainer.validate(settings.steps) if run.valid_rows.num_rows and settings.val_batches else {}
    if not any(step == settings.steps for step, _ in run_folder.checkpoints(out)):
        checkpoint_io.save(run, settings.steps)
    in_sync = trainer.replicas_in_sync()
    final = out / "final"
    if run.main:
        _export(run, final)
        summary = {
            "steps": settings.steps,
            "last_loss": last_loss,
            "validation_nelbo": validation,
            "replicas_in_sync": in_sync,
            "processes": run.world,
            "final": str(final),
        }
        write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        write_card(final)  # final/README.md again, now with the run's facts (settings.json, summary.json)
        run.emit({"event": "done", **summary})
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return FinetuneResult(out, final, settings.steps, last_loss, validation, in_sync)


def _export(run: TrainingRun, final: Path) -> None:
    """Save the EMA weights to `final`, with the config saying how they were trained (main process)."""
    # BD3-LM's `block_size` field keeps the smallest size. The noise interval goes where BD3-LM keeps it: the config
    # fields and the sampling_eps_min/max buffers. Per-size intervals: the config fields take the smallest block
    # size's, the full map goes to `extra`.
    denoiser, mix, length = run.denoiser, run.mix, run.length
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
    with checkpoint_io.saving("the final weights", final, run.out), run.ema.swapped_in(denoiser):
        save_model(denoiser, final, run.tokenizer)


def _start_event(run: TrainingRun, start: int) -> dict[str, Any]:
    """What the run is about to do and where its outputs go (the CLI prints it before the first step)."""
    settings, out = run.settings, run.out
    validated = min(run.valid_rows.num_rows, settings.val_batches * VALIDATION_BATCH_ROWS)
    return {
        "event": "start",
        "step": start,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "micro_batch_size": settings.micro_batch_size,
        "accumulation": run.accumulation,
        "processes": run.world,
        "tokens_per_step": settings.batch_size * run.length,
        "validation_rows": validated,
        "val_every": settings.val_every,
        "checkpoints": str(out / "checkpoints"),
        "save_every": settings.save_every,
        "metrics": str(out / "metrics.jsonl"),
        "final": str(out / "final"),
    }


def _warn_if_frozen(run: TrainingRun, start: int) -> None:
    """Warn when the run cannot move the exported (EMA) weights much: warmup past the end, or a slow EMA."""
    settings, ema = run.settings, run.ema
    remaining = settings.steps - start
    if remaining <= 0:
        return
    if settings.warmup > settings.steps:
        run.warn(
            f"--warmup {settings.warmup} is longer than --steps {settings.steps}: the learning rate reaches only "
            f"{settings.steps / settings.warmup:.1%} of --lr {settings.lr:g}"
        )
    kept = ema.kept_fraction(remaining)
    if kept > 0.99:
        run.warn(
            f"--ema {ema.decay:g} after {ema.num_updates} updates keeps {kept:.2%} of the current average over the "
            f"remaining {remaining} steps: the exported weights will barely change; lower --ema"
        )


class Trainer:
    """Steps a `TrainingRun`: optimizer steps, logging, validation, `--clip auto` search, checkpoints."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.metrics = run.out / "metrics.jsonl"

    def _batch(self, step: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows, x_t and per-token t for a step: noise for the global batch, then this rank's slice."""
        settings = self.run.settings
        clean = self.run.train_rows.batch(step * settings.batch_size, settings.batch_size)
        generator = torch.Generator().manual_seed(step_seed(settings.seed, step, "noise"))
        interval = clip_for(self.run.clip, block_size, self.run.length)
        noisy, t_token = noise_batch(
            clean, block_size, self.run.denoiser.mask_id, generator, interval, resample=settings.resample
        )
        # Interleaved rows: t is stratified along the batch, so contiguous slices would give one rank all the
        # heavily masked rows (and most of the vocabulary projections); every rank gets an even spread instead.
        rows = slice(self.run.rank, None, self.run.settings.batch_size // self.run.rows_per_rank)
        device = self.run.accelerator.device
        return clean[rows].to(device), noisy[rows].to(device), t_token[rows].to(device)

    def train(self, start: int) -> float:
        """Optimizer steps from `start` to `settings.steps`; returns the last step's loss.

        Raises:
            TrainingInterrupted: after Ctrl-C, once the current step is finished and saved.
        """
        with _StopRequest(self.run.emit) as stop:
            return self._train(start, stop)

    def _train(self, start: int, stop: _StopRequest) -> float:
        settings, accelerator = self.run.settings, self.run.accelerator
        self.run.objective.train()
        window: dict[int, list[float]] = {}
        tic, tokens_since, last_loss = time.perf_counter(), 0, float("nan")
        run_start, saved_at = tic, -1
        for step in range(start, settings.steps):
            block_size = self.run.mix.draw(torch.Generator().manual_seed(step_seed(settings.seed, step, "block")))
            clean, noisy, t = self._batch(step, block_size)
            weighted = not is_unweighted(clip_for(self.run.clip, block_size, self.run.length)[0])
            normaliser = self.run.rows_per_rank * self.run.length
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(self.run.accumulation):
                rows = slice(micro * settings.micro_batch_size, (micro + 1) * settings.micro_batch_size)
                last_micro = micro == self.run.accumulation - 1
                context = accelerator.no_sync(self.run.objective) if not last_micro else nullcontext()
                with context:
                    loss = self.run.objective(clean[rows], noisy[rows], t[rows], block_size, weighted) / normaliser
                    accelerator.backward(loss)
                step_loss += loss.detach()
            step_loss = accelerator.reduce(step_loss, reduction="mean")
            last_loss = float(step_loss)
            if not math.isfinite(last_loss):
                raise TrainingDivergedError(
                    f"the loss became {last_loss} at step {step + 1} (block size {block_size})"
                    + checkpoint_io.last_good(self.run.out)
                )
            grad_norm = accelerator.clip_grad_norm_(self.run.objective.parameters(), settings.grad_clip)
            if grad_norm is not None and not math.isfinite(float(grad_norm)):
                # Gradients are all-reduced, so every rank sees the same norm and stops together, before the step
                # that would poison the weights, the EMA and the next checkpoint.
                raise TrainingDivergedError(
                    f"the gradient norm became {float(grad_norm)} at step {step + 1} (block size {block_size})"
                    + checkpoint_io.last_good(self.run.out)
                )
            self.run.optimizer.step()
            self.run.scheduler.step()
            self.run.optimizer.zero_grad(set_to_none=True)
            self.run.ema.update(self.run.denoiser.parameters())
            window.setdefault(block_size, []).append(last_loss)
            tokens_since += settings.batch_size * self.run.length
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
                        "lr": self.run.scheduler.get_last_lr()[0],
                        "tokens_per_s": rate,
                        "eta_s": (settings.steps - done) / max(steps_per_s, 1e-9),
                    }
                )
                window, tic, tokens_since = {}, now, 0
            if settings.val_every and done % settings.val_every == 0 and done != settings.steps:
                self.validate(done)
                tic = time.perf_counter()  # throughput counts training time only
            if done % settings.save_every == 0 and done != settings.steps:
                checkpoint_io.save(self.run, done)
                saved_at, tic = done, time.perf_counter()
            if self._stop_requested(stop):
                target = (
                    checkpoint_io.save(self.run, done)
                    if saved_at != done
                    else self.run.out / "checkpoints" / f"step_{done:08d}"
                )
                raise TrainingInterrupted(f"interrupted: saved step {done} to {target}; continue with --resume")
        return last_loss

    def _stop_requested(self, stop: _StopRequest) -> bool:
        """Whether any process saw Ctrl-C (all processes agree, so they save and stop at the same step)."""
        if self.run.accelerator.num_processes == 1:
            return stop.requested
        votes = torch.tensor(float(stop.requested), device=self.run.accelerator.device)
        return bool(self.run.accelerator.reduce(votes, reduction="sum").item() > 0)

    def validate(self, step: int) -> dict[int, float]:
        """Token-weighted NELBO per block size of the mix on the held-out rows, with the EMA weights (main process).

        The rows and noise are `training.validation`'s: they depend on --seed and --val-batches, never on the
        micro-batch size (which only bounds rows per forward pass) or the process count.
        """
        results: dict[int, float] = {}
        settings = self.run.settings
        if self.run.valid_rows.num_rows and settings.val_batches and self.run.accelerator.is_main_process:
            batches = validation_batches(self.run.valid_rows, settings.val_batches)
            model = self.run.denoiser
            was_training = model.training
            model.eval()
            with self.run.ema.swapped_in(model), self.run.accelerator.autocast():
                for size in self.run.mix.sizes:
                    results[size] = held_out_nelbo(model, batches, size, settings.seed, settings.micro_batch_size)
                if settings.clip == AUTO_CLIP:
                    self._search_clip(step, batches)
            model.train(was_training)
            self._log({"event": "validation", "step": step, "nelbo": {str(k): v for k, v in results.items()}})
        if settings.clip == AUTO_CLIP and self.run.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = broadcast_object_list([self.run.clip_state.intervals])
            self.run.clip_state.intervals = shared[0]
        self.run.accelerator.wait_for_everyone()
        return results

    def _search_clip(self, step: int, batches: list[torch.Tensor]) -> None:
        """`--clip auto`: per block size above 1, the lowest-variance interval on the validation batches."""
        settings = self.run.settings
        for size in (s for s in self.run.mix.sizes if s > 1):

            def losses_for(interval: tuple[float, float], size: int = size) -> list[torch.Tensor]:
                return [
                    block_losses(
                        self.run.denoiser,
                        clean,
                        size,
                        interval,
                        batch_generator(settings.seed, index, f"clip:{size}"),
                        chunk_rows=settings.micro_batch_size,
                    )
                    for index, clean in enumerate(batches)
                ]

            chosen, variances = search_clip(clip_candidates(), losses_for)
            self.run.clip_state.intervals[size] = chosen
            self._log(
                {"event": "clip_search", "step": step, "block_size": size, "clip": list(chosen), "variance": variances}
            )

    def replicas_in_sync(self) -> bool:
        """Whether every process holds identical weights (a cheap checksum gathered from each rank)."""
        with torch.no_grad():
            checksum = sum(p.double().sum() * (i + 1) for i, p in enumerate(self.run.denoiser.parameters()))
        gathered = self.run.accelerator.gather(checksum.reshape(1).to(self.run.accelerator.device)).cpu()
        return bool((gathered == gathered[0]).all())

    def _log(self, event: dict[str, Any]) -> None:
        if self.run.accelerator.is_main_process:
            with open(self.metrics, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")
            self.run.emit(event)
            numbers = {k: v for k, v in event.items() if isinstance(v, int | float) and k != "step"}
            if self.run.settings.report_to:
                self.run.accelerator.log(numbers, step=event["step"])


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

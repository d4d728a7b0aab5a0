"""Training checkpoints of a run folder: saving a run's full state atomically, loading it back, naming the newest.

A checkpoint is written to `checkpoints/.tmp-step_N` with a manifest and renamed to `checkpoints/step_N`; only the
last `--keep-last` are kept. A NaN or inf loss stops the run before anything is saved, so the newest checkpoint on
disk is always a good one; a write that fails (a full disk) removes the staging folder and says, in one line, which
file failed and which checkpoint is the last good one. The file format (safetensors + JSON, never pickle) is
`training.state`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from did_cli.errors import ModelLoadError, OutputError
from did_cli.training import state
from did_cli.training.run_folder import checkpoints

if TYPE_CHECKING:
    from did_cli.training.setup import TrainingRun

__all__ = ["interrupted_message", "last_good", "load", "save", "saving"]


def last_good(out: Path) -> str:
    """A clause naming the newest checkpoint, for a message about a run that stopped."""
    kept = checkpoints(out)
    return f"; the last good checkpoint is {kept[-1][1]}" if kept else "; no checkpoint was saved yet"


def interrupted_message(out: Path) -> str:
    """What a Ctrl-C outside the save-then-stop path leaves: the newest checkpoint on disk, or none."""
    kept = checkpoints(out)
    if not kept:
        return "interrupted; nothing was saved (no checkpoint exists yet)"
    return f"interrupted; the newest checkpoint is {kept[-1][1]}: continue from it with --resume"


@contextmanager
def saving(what: str, where: Path, out: Path) -> Iterator[None]:
    """Turn a failed write of a checkpoint or of the final weights into one line that says what was kept.

    A full disk surfaces as an OSError (naming the file where the OS does) or as safetensors' bare "I/O error"
    (`state.save_tensors` adds the file); either becomes an OutputError naming the file and the newest checkpoint,
    which `--resume` continues from.

    Args:
        what: what was being written (`checkpoint step_00000020`, `the final weights`).
        where: the file or folder to name when the error does not name one.
        out: the run folder (for its newest checkpoint).

    Raises:
        OutputError: the write failed.
    """
    try:
        yield
    except (OSError, SafetensorError) as exc:
        file = getattr(exc, "filename", None) or where
        reason = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
        kept = checkpoints(out)
        tail = (
            f"; the last good checkpoint is {kept[-1][1]}: continue from it with --resume"
            if kept
            else "; no checkpoint was saved yet"
        )
        raise OutputError(f"cannot write {what}: {reason} ({file}){tail}") from None


def save(run: TrainingRun, step: int) -> Path:
    """Write a full training state for `step` atomically, with its manifest, and keep the last `keep_last`.

    Raises:
        OutputError: a file could not be written (a full disk, say); the staging folder is removed and the message
            names the file and the last good checkpoint.
    """
    folder = run.out / "checkpoints"
    staging = folder / f".tmp-step_{step:08d}"
    target = folder / f"step_{step:08d}"
    accelerator = run.accelerator
    with saving(f"checkpoint {target.name}", staging, run.out):
        try:
            _stage(run, step, staging)
        except BaseException:
            if run.main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if run.main:
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
            for _, old in checkpoints(run.out)[: -run.settings.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            run.emit({"event": "checkpoint", "step": step, "path": str(target)})
    accelerator.wait_for_everyone()
    return target


def _stage(run: TrainingRun, step: int, staging: Path) -> None:
    """Every process's files for `step` in `staging`, then the manifest (main process)."""
    accelerator = run.accelerator
    if run.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state.save_rng(staging / state.rng_file(run.rank), state.capture_rng())
    if run.main:
        _write_state(run, staging, step)
    accelerator.wait_for_everyone()
    if run.main:
        state.write_manifest(staging)


def _write_state(run: TrainingRun, staging: Path, step: int) -> None:
    """Weights, optimizer, EMA (safetensors) and the rest (JSON) of the main process."""
    module = run.accelerator.unwrap_model(run.objective)
    state.save_tensors(staging / state.MODEL, module.state_dict(), {"format": "pt"})
    tensors, rest = state.split_optimizer_state(run.optimizer.state_dict())
    state.save_tensors(staging / state.OPTIMIZER, tensors)
    names = [name for name, _ in run.denoiser.named_parameters()]
    state.save_tensors(staging / state.EMA_WEIGHTS, dict(zip(names, run.ema.shadow, strict=True)))
    scaler = run.accelerator.scaler
    record = {
        "format": state.FORMAT,
        "step": step,
        "processes": run.world,
        "scheduler": {"last_epoch": run.scheduler.last_epoch},
        "optimizer": rest,
        "ema": {"decay": run.ema.decay, "num_updates": run.ema.num_updates},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "settings": json.loads(json.dumps(dataclasses.asdict(run.settings), default=str)),
        "overrides": run.overrides,
        "clip_search": run.clip_state.state_dict(),  # --clip auto's choices, kept across --resume
    }
    (staging / state.STATE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def load(run: TrainingRun, folder: Path, saved: dict[str, Any]) -> int:
    """Restore the state `save` wrote into `folder` (its JSON part already read as `saved`); returns its step.

    The EMA decay, learning rate and warmup come from this run's settings: the schedule is a function of the
    step, so it is rebuilt at the saved position (a changed --lr or --warmup therefore takes effect).

    Raises:
        ModelLoadError: the checkpoint does not fit this run or cannot be read, in one line.
    """
    try:
        _load(run, folder, saved)
    except (RuntimeError, KeyError, ValueError, TypeError, OSError, SafetensorError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{folder} does not fit this run or is unreadable: {first_line}") from None
    return int(saved["step"])


def _load(run: TrainingRun, folder: Path, saved: dict[str, Any]) -> None:
    module = run.accelerator.unwrap_model(run.objective)
    module.load_state_dict(state.load_tensors(folder / state.MODEL), strict=True)
    tensors = state.load_tensors(folder / state.OPTIMIZER)
    run.optimizer.load_state_dict(state.join_optimizer_state(tensors, saved["optimizer"]))
    shadows = state.load_tensors(folder / state.EMA_WEIGHTS)
    names = [name for name, _ in run.denoiser.named_parameters()]
    run.ema.shadow = [shadows[n].to(s.device, s.dtype) for n, s in zip(names, run.ema.shadow, strict=True)]
    run.ema.num_updates = int(saved["ema"]["num_updates"])
    last_epoch = int(saved["scheduler"]["last_epoch"])
    scheduler, groups, lr = run.scheduler, run.optimizer.param_groups, run.settings.lr
    scheduler.base_lrs = [lr for _ in groups]
    lrs = [base * fn(last_epoch) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, value in zip(groups, lrs, strict=True):
        group["initial_lr"], group["lr"] = lr, value
    scheduler_state = scheduler.state_dict() | {"last_epoch": last_epoch, "_last_lr": lrs}
    scheduler.load_state_dict(scheduler_state | {"_step_count": last_epoch + 1})
    if saved.get("scaler") and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(saved["scaler"])
    if saved.get("clip_search"):
        run.clip_state.load_state_dict(saved["clip_search"])
    rng = folder / state.rng_file(run.rank)
    if rng.exists():  # a process that did not exist when the checkpoint was saved keeps its seeded streams
        state.restore_rng(rng)

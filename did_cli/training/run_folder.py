"""The run folder of `did finetune`: one run at a time, no leftovers, no mixing of two runs' records.

* The folder is locked for the whole run by the main process (`did_cli.locks.locked_folder`).
* Staging folders left by a killed run (`.final.*`, `checkpoints/.tmp-step_*`, temporary files) are removed when the
  next run takes the lock: nobody else can be writing them then.
* A fresh run refuses a folder that holds an earlier run unless told to overwrite it; a resumed run drops the
  metrics lines past the step it resumes from, so `metrics.jsonl` describes one trajectory.
* A resumed run compares its settings with the checkpoint's and names the first difference.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

from did_cli.errors import UsageError
from did_cli.files import write_text_atomically
from did_cli.settings import FinetuneSettings

_CHECKPOINT = re.compile(r"^step_(\d+)$")
RUN_FILES = ("metrics.jsonl", "settings.json", "summary.json")
RUN_FOLDERS = ("checkpoints", "final")
# Settings that change how or how long a run is watched, not the trajectory its weights follow.
FREE_SETTINGS = frozenset(
    {"out", "resume", "steps", "save_every", "keep_last", "val_every", "val_batches", "log_every", "cache_dir"}
    | {"num_proc", "report_to", "require_validation"}
)
_FLAGS = {"init_overrides": "--hidden-dim/--n-blocks/--n-heads/--cond-dim/--dropout", "resample": "--no-resample"}


def clean_staging(out: Path) -> list[Path]:
    """Remove staging folders and temporary files a killed run left in `out`; returns what was removed.

    Call only while holding the lock.
    """
    leftovers = [*out.glob(".final.*"), *out.glob(".metrics.jsonl.*"), *out.glob(".settings.json.*")]
    leftovers += [*out.glob(".summary.json.*"), *(out / "checkpoints").glob(".tmp-step_*")]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint in the run folder `out`, oldest first."""
    folder = out / "checkpoints"
    if not folder.exists():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def earlier_run(out: Path) -> list[str]:
    """Names of an earlier run's outputs found in `out` (empty when it holds none)."""
    return [name for name in (*RUN_FILES, *RUN_FOLDERS) if (out / name).exists()]


def remove_earlier_run(out: Path) -> None:
    """Delete an earlier run's outputs (metrics, settings, summary, checkpoints, final) from `out`."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)


def comparable(settings: FinetuneSettings) -> dict[str, Any]:
    """The settings that shape the trajectory, as JSON values (so they compare equal to a stored copy)."""
    values = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    return {k: v for k, v in values.items() if k not in FREE_SETTINGS}


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, stored value, current value) for every trajectory setting that differs, in field order.

    Settings the checkpoint does not know (added to did after it was written) are not compared.
    """
    return [(k, stored[k], v) for k, v in current.items() if k in stored and stored[k] != v]


def flag(name: str) -> str:
    """The CLI option for a settings field."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def describe_change(change: dict[str, Any]) -> str:
    """One line for an allowed settings change (an override record of `check_settings`)."""
    before, after = json.dumps(change["from"]), json.dumps(change["to"])
    return f"{flag(change['setting'])} changes from {before} to {after} at step {change['step']}"


def drop_metrics_after(metrics: Path, step: int) -> int:
    """Keep only the lines of `metrics` (JSONL) up to `step`, atomically; returns how many lines were dropped."""
    if not metrics.exists():
        return 0
    kept, dropped = [], 0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            dropped += 1  # a torn last line from a crash
            continue
        if isinstance(event, dict) and isinstance(event.get("step"), int) and event["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text_atomically(metrics, "".join(line + "\n" for line in kept))
    return dropped


def check_settings(saved: dict[str, Any], settings: FinetuneSettings, folder: Path, allowed: bool) -> list[dict]:
    """Settings changes against the checkpoint's, as override records; refused unless `allowed`."""
    changed = differences(saved["settings"], comparable(settings))
    if changed and not allowed:
        name, before, now = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise UsageError(
            f"{flag(name)} is {json.dumps(now)} but {folder.name} was trained with {json.dumps(before)}"
            f"{more}; pass the checkpoint's value, or --allow-settings-change to continue with the new one"
        )
    return [{"step": saved["step"], "setting": k, "from": before, "to": now} for k, before, now in changed]

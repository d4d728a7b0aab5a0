"""Run-folder and checkpoint integrity of `did finetune`: locking, manifests, pickle-free resume, settings checks,
Ctrl-C, warnings and progress lines."""

import fcntl
import hashlib
import importlib
import json
import math
import os
import pickle
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from did_cli.cli import app
from did_cli.errors import DataError, ModelLoadError, UsageError
from did_cli.training import setup, state
from did_cli.training.ema import EMA
from did_cli.training.loop import TrainingInterrupted, finetune
from tests.training.conftest import deadline, make_settings

runner = CliRunner()
finetune_cli = importlib.import_module("did_cli.cli.finetune")  # the package re-exports the command under this name


def _events(settings, **kwargs):
    seen = []
    result = finetune(settings, on_event=seen.append, **kwargs)
    return result, seen


def _warnings(events):
    return [e["message"] for e in events if e["event"] == "warning"]


def _same_weights(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_checkpoint, corpus):
    """The uninterrupted 20-step run every resumed run must reproduce bit for bit."""
    return finetune(make_settings(tmp_path_factory.mktemp("straight"), tiny_checkpoint, corpus, save_every=5))


def _cli_args(tmp_path, tiny_checkpoint, corpus, *extra):
    args = ["finetune", "--init", "tiny", "--hidden-dim", "32", "--n-blocks", "2", "--n-heads", "2", "--cond-dim"]
    args += ["16", "--tokenizer", str(tiny_checkpoint), "--data", str(corpus), "--seq-len", "32", "--steps", "6"]
    args += ["--batch-size", "4", "--micro-batch-size", "4", "--warmup", "2", "--save-every", "3", "--val-every"]
    return args + ["0", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *extra]


# 1. one run per folder


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path, tiny_checkpoint, corpus):
    settings = make_settings(tmp_path, tiny_checkpoint, corpus, steps=2, warmup=2)
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a") as other_run:
        fcntl.flock(other_run.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match="another did finetune is running"):
            finetune(settings)
        assert not (tmp_path / "run" / "checkpoints").exists()
        result = runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, "-q"))
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    finetune(settings)  # released by the other run: this one proceeds
    with open(tmp_path / "run" / ".lock", "a") as after:
        fcntl.flock(after.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # and this run released it when it ended


# 2. checkpoint integrity


def test_checkpoint_manifest_lists_every_file_with_its_size_and_sha256(tmp_path, tiny_checkpoint, corpus):
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=10))
    folder = tmp_path / "run" / "checkpoints" / "step_00000010"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    files = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest) == files
    assert {"model.safetensors", "optimizer.safetensors", "ema.safetensors", "rng_0.safetensors"} <= set(files)
    for name in files:
        data = (folder / name).read_bytes()
        assert manifest[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: _truncate(folder / "model.safetensors"),
        lambda folder: (folder / "optimizer.safetensors").unlink(),
        lambda folder: _truncate(folder / "rng_0.safetensors"),
        lambda folder: _truncate(folder / "ema.safetensors"),
    ],
    ids=["truncated-weights", "missing-optimizer", "truncated-rng", "truncated-ema"],
)
def test_resume_falls_back_past_a_damaged_checkpoint_and_still_matches(
    tmp_path, tiny_checkpoint, corpus, straight, damage
):
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=15, save_every=5))
    checkpoints = tmp_path / "run" / "checkpoints"
    damage(checkpoints / "step_00000015")
    result, events = _events(make_settings(tmp_path, tiny_checkpoint, corpus, save_every=5, resume=True))
    (warning,) = _warnings(events)
    assert "step_00000015 is damaged" in warning and "resuming from step_00000010" in warning
    assert (checkpoints / "damaged-step_00000015").is_dir()
    assert [e["step"] for e in events if e["event"] == "resume"] == [10]
    assert _same_weights(straight.final / "model.safetensors", result.final / "model.safetensors")


def test_resume_with_no_intact_checkpoint_fails_in_one_line(tmp_path, tiny_checkpoint, corpus):
    assert runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, "-q")).exit_code == 0
    for folder in (tmp_path / "run" / "checkpoints").iterdir():
        _truncate(folder / "rng_0.safetensors")
    result = runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, "--steps", "9", "--resume", "-q"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no intact checkpoint") and len(result.stderr.strip().splitlines()) == 1


def test_staging_folders_of_a_killed_run_are_removed(tmp_path, tiny_checkpoint, corpus):
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=10))
    out = tmp_path / "run"
    for leftover in (out / ".final.k1ll3d", out / "checkpoints" / ".tmp-step_00000015"):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half a file")
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=12, resume=True))
    assert not (out / ".final.k1ll3d").exists() and not (out / "checkpoints" / ".tmp-step_00000015").exists()


# 3. nothing is unpickled


class _RunsCode:
    def __reduce__(self):
        return (open, (str(_RunsCode.marker), "w"))


def test_resume_never_unpickles_a_crafted_checkpoint(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=10))
    folder = tmp_path / "run" / "checkpoints" / "step_00000010"
    _RunsCode.marker = tmp_path / "code-ran"
    payload = pickle.dumps({"state": _RunsCode()})
    # What accelerate's load_state would read, and a did file replaced by a pickle; the attacker rewrites the
    # manifest too, so only the file format stands between the pickle and the loader.
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"):
        (folder / name).write_bytes(payload)
    (folder / "ema.safetensors").write_bytes(payload)
    state.write_manifest(folder)
    unsafe_loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        unsafe_loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    with pytest.raises(ModelLoadError, match="does not fit this run or is unreadable"):
        finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=12, resume=True))
    assert not _RunsCode.marker.exists()
    assert unsafe_loads == []


# 4. settings on resume


@pytest.mark.parametrize(
    "change,flag",
    [({"lr": 1e-3}, "--lr"), ({"batch_size": 16}, "--batch-size"), ({"mix": "4:1"}, "--mix"), ({"ema": 0.5}, "--ema")],
)
def test_resume_with_other_settings_is_refused_naming_the_first_difference(
    tmp_path, tiny_checkpoint, corpus, change, flag
):
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=10))
    with pytest.raises(UsageError, match=f"^{flag} is .* but step_00000010 was trained with .*--allow-settings-change"):
        finetune(make_settings(tmp_path, tiny_checkpoint, corpus, resume=True, **change))


def test_an_allowed_settings_change_applies_and_settings_json_says_so(tmp_path, tiny_checkpoint, corpus):
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=10))
    resumed = make_settings(tmp_path, tiny_checkpoint, corpus, resume=True, lr=1e-3)
    _, events = _events(resumed, allow_settings_change=True)
    assert any("--lr changes from 0.003 to 0.001 at step 10" in w for w in _warnings(events))
    lrs = {e["step"]: e["lr"] for e in events if e["event"] == "train"}
    assert lrs == {15: 1e-3, 20: 1e-3}  # past the warmup: the new peak learning rate, not the checkpoint's
    record = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert record["settings"]["lr"] == 1e-3 and record["resumed_from"] == 10
    assert record["overrides"] == [{"step": 10, "setting": "lr", "from": 0.003, "to": 0.001}]


def test_cli_settings_change_needs_the_override_flag(tmp_path, tiny_checkpoint, corpus):
    assert runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, "-q")).exit_code == 0
    more = ["--steps", "9", "--resume", "--lr", "0.001", "-q"]
    refused = runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, *more))
    assert refused.exit_code == 2 and "--lr" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    allowed = runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, *more, "--allow-settings-change"))
    assert allowed.exit_code == 0, allowed.stderr
    assert allowed.stderr.startswith("warning: --lr changes from 0.0003 to 0.001 at step 6")


# 5. Ctrl-C


def _interrupt_at_call(monkeypatch, call, how):
    """Ctrl-C during the `call`-th micro-batch (make_settings: two per optimizer step; _cli_args: one)."""
    calls = {"n": 0}
    real = setup.nelbo_sum

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            how()
        return real(*args, **kwargs)

    monkeypatch.setattr(setup, "nelbo_sum", interrupted)


def test_ctrl_c_saves_the_step_it_interrupts_and_the_resume_matches(
    tmp_path, tiny_checkpoint, corpus, straight, monkeypatch
):
    _interrupt_at_call(monkeypatch, 2 * 7 - 1, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingInterrupted, match="saved step 7 to .*step_00000007; continue with --resume"):
        finetune(make_settings(tmp_path, tiny_checkpoint, corpus, save_every=5))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000005", "step_00000007"]
    assert state.damage(checkpoints / "step_00000007") is None
    monkeypatch.undo()
    resumed = finetune(make_settings(tmp_path, tiny_checkpoint, corpus, save_every=5, resume=True))
    assert _same_weights(straight.final / "model.safetensors", resumed.final / "model.safetensors")


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def test_ctrl_c_before_any_checkpoint_says_nothing_was_saved(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    _interrupt_at_call(monkeypatch, 2, _raise_keyboard_interrupt)  # as a second Ctrl-C would: no time to save
    result = runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, "-q"))
    assert result.exit_code == 130
    assert result.stderr == "interrupted; nothing was saved (no checkpoint exists yet)\n"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_after_a_crash_keeps_one_metrics_line_per_step(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    _interrupt_at_call(monkeypatch, 2 * 13 - 1, _raise_keyboard_interrupt)
    with pytest.raises(TrainingInterrupted, match="newest checkpoint is .*step_00000010: continue from it"):
        finetune(make_settings(tmp_path, tiny_checkpoint, corpus, log_every=1))
    monkeypatch.undo()
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, log_every=1, resume=True))
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, 21))


# 6. warnings: the exported model would barely move


def test_warmup_longer_than_the_run_warns(tmp_path, tiny_checkpoint, corpus):
    _, events = _events(make_settings(tmp_path / "long", tiny_checkpoint, corpus, steps=4, warmup=10))
    assert _warnings(events) == [
        "--warmup 10 is longer than --steps 4: the learning rate reaches only 40.0% of --lr 0.003"
    ]
    _, events = _events(make_settings(tmp_path / "ok", tiny_checkpoint, corpus, steps=4, warmup=4))
    assert _warnings(events) == []


@pytest.mark.parametrize("decay,done,more", [(0.9999, 0, 100), (0.9999, 50_000, 30), (0.5, 10, 3)])
def test_ema_kept_fraction_is_what_the_average_keeps(decay, done, more):
    weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ema = EMA([weight], decay)
    ema.num_updates = done
    kept = ema.kept_fraction(more)
    with torch.no_grad():
        weight.fill_(1.0)
    for _ in range(more):
        ema.update([weight])
    assert kept == pytest.approx(1.0 - ema.shadow[0].item(), rel=1e-5, abs=1e-6)  # the shadow is float32


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 0.9999])
def test_ema_kept_fraction_is_the_product_of_the_decays_for_any_number_of_updates(decay):
    ema = EMA([torch.nn.Parameter(torch.zeros(1))], decay)
    capped_from = math.ceil((10 * decay - 1) / (1 - decay))  # where the warmup reaches the decay
    for done in sorted({0, 1, 8, 9, 10} | {max(0, capped_from + shift) for shift in (-2, -1, 0, 1)}):
        for more in (0, 1, 2, 9, 10, 11, 300):
            ema.num_updates = done
            expected = math.prod(ema.decay_at(update) for update in range(done + 1, done + more + 1))
            assert ema.kept_fraction(more) == pytest.approx(expected, rel=1e-12, abs=1e-300), (done, more)
    with deadline(30):  # it used to loop once per update: 1e18 updates would never finish
        assert 0.0 <= ema.kept_fraction(10**18) < 1e-300


def test_an_ema_too_slow_for_the_remaining_steps_warns(tmp_path, tiny_checkpoint, corpus):
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=10))
    folder = tmp_path / "run" / "checkpoints" / "step_00000010"
    record = json.loads((folder / "training_state.json").read_text())
    record["ema"]["num_updates"] = 90_000  # as after a long run; the decay is then capped at 0.9999
    (folder / "training_state.json").write_text(json.dumps(record))
    state.write_manifest(folder)
    _, events = _events(make_settings(tmp_path, tiny_checkpoint, corpus, steps=15, resume=True))
    (warning,) = _warnings(events)
    assert warning.startswith("--ema 0.9999 after 90000 updates keeps 99.95% of the current average")


# 7. a fresh run never mixes with an earlier one


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_unless_overwriting(tmp_path, tiny_checkpoint, corpus):
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=4, warmup=2))
    # A run killed before its first checkpoint leaves only metrics and settings.
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    shutil.rmtree(tmp_path / "run" / "final")
    (tmp_path / "run" / "summary.json").unlink()
    with pytest.raises(UsageError, match="holds an earlier run .*metrics.jsonl.*--overwrite"):
        finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=4, warmup=2))
    finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=4, warmup=2), overwrite=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in lines] == [("train", 4), ("validation", 4)]


# 8. validation that cannot run


def test_requested_validation_on_a_too_short_split_is_refused(tmp_path, tiny_checkpoint, corpus):
    (tmp_path / "valid.txt").write_text("Too short.\n")
    required = dict(steps=2, val_every=1, val_fraction=0.0, require_validation=True)
    with pytest.raises(DataError, match="validation split has .* fewer than one sequence of 32; .*--val-batches 0"):
        finetune(make_settings(tmp_path, tiny_checkpoint, corpus, **required))
    with pytest.raises(DataError, match="--valid-data"):
        finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=2, valid_data=str(tmp_path / "valid.txt")))


def test_validation_not_required_on_a_too_short_split_is_skipped_with_a_note(tmp_path, tiny_checkpoint, corpus):
    result, events = _events(make_settings(tmp_path, tiny_checkpoint, corpus, steps=2, warmup=2, val_fraction=0.0))
    assert _warnings(events) == []
    assert [e["message"] for e in events if e["event"] == "note"] == [
        "the validation split has 0 tokens, fewer than one sequence of 32: this run is not validated "
        "(--valid-data or a larger --val-fraction would validate it)"
    ]
    assert result.validation == {}


# 10. progress in logs


@pytest.mark.parametrize("interval,steps_shown", [(3600.0, [1, 6]), (0.0, [1, 2, 3, 4, 5, 6])])
def test_progress_in_logs_is_plain_and_rate_limited(
    tmp_path, tiny_checkpoint, corpus, monkeypatch, interval, steps_shown
):
    monkeypatch.setattr(finetune_cli, "PLAIN_INTERVAL_S", interval)
    result = runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, "--log-every", "1"))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert [int(line.split()[1]) for line in progress] == steps_shown
    assert all("loss" in line and "tok/s" in line for line in progress)
    assert "\x1b[" not in result.stderr and lines[-1].startswith("done: 6 steps")


def test_quiet_keeps_warnings_only(tmp_path, tiny_checkpoint, corpus):
    result = runner.invoke(app, _cli_args(tmp_path, tiny_checkpoint, corpus, "--warmup", "10", "-q"))
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr.startswith("warning: --warmup 10 is longer than --steps 6")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.slow
def test_stdout_stays_empty_when_stderr_is_a_terminal(tmp_path, tiny_checkpoint, corpus):
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    args = _cli_args(tmp_path, tiny_checkpoint, corpus, "--log-every", "1")
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "stdout", "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "did_cli", *args], stdout=stdout, stderr=follower, env=env)
    os.close(follower)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        terminal += chunk
    os.close(leader)
    assert done.returncode == 0, terminal.decode(errors="replace")
    assert (tmp_path / "stdout").read_bytes() == b""
    assert b"step       6" in terminal and b"done" in terminal

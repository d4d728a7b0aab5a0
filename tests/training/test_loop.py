import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from did_cli.checkpoints import load_model
from did_cli.cli import app
from did_cli.errors import TrainingDivergedError, UsageError
from did_cli.execution import optimize
from did_cli.training import setup
from did_cli.training.loop import finetune
from tests.training.conftest import make_settings as _settings

runner = CliRunner()


def test_validation_loss_goes_down(tmp_path, tiny_checkpoint, corpus):
    settings = _settings(tmp_path, tiny_checkpoint, corpus, steps=40, val_every=10, ema=0.5)
    result = finetune(settings)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validations = [e["nelbo"] for e in events if e["event"] == "validation"]
    for size in ("4", "32"):
        assert validations[-1][size] < validations[0][size] - 0.3
    assert {e["block_size"] for e in events if e["event"] == "train"} <= {4, 32}
    model = load_model(str(result.final))
    assert model.config.extra["did_training_mix"] == "4:0.7,32:0.3"
    assert model.config.extra["did_training_clip"] == {"4": [0.001, 1.0], "32": [0.001, 1.0]}
    assert result.replicas_in_sync


@pytest.fixture
def default_threads():
    """Torch's default thread count (one per core, at least 2), whatever OMP_NUM_THREADS the suite runs with."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 2))
    yield
    torch.set_num_threads(before)


def _word_settings(tmp_path, word_data, **overrides):
    # 16 rows x 2 x 64 tokens x width 32 per micro-batch: large enough for torch to split the embedding backward
    # over threads, where indexing (`weight[tokens]`) accumulates in a nondeterministic order.
    tokenizer, corpus = word_data
    base = dict(seq_len=64, batch_size=16, micro_batch_size=16, val_batches=0)
    return _settings(tmp_path, tokenizer, corpus, **(base | overrides))


def test_resumed_run_ends_with_the_same_weights(tmp_path, word_data, default_threads):
    straight = finetune(_word_settings(tmp_path / "a", word_data, steps=4, save_every=2, warmup=2))
    assert load_model(str(straight.final)).config.vocab_size > 3000
    finetune(_word_settings(tmp_path / "b", word_data, steps=2, save_every=2, warmup=2))
    resumed = finetune(_word_settings(tmp_path / "b", word_data, steps=4, save_every=2, warmup=2, resume=True))
    for name in ("checkpoints/step_00000004/model.safetensors", "final/model.safetensors"):
        a = load_file(str(straight.out / name))
        b = load_file(str(resumed.out / name))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_existing_run_needs_resume(tmp_path, tiny_checkpoint, corpus):
    finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=10))
    with pytest.raises(UsageError, match="--resume"):
        finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=20))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    calls = {"n": 0}
    real = setup.nelbo_sum

    def flaky(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > 2 * 12 else value  # step 13 (2 micro-batches per step)

    monkeypatch.setattr(setup, "nelbo_sum", flaky)
    with pytest.raises(TrainingDivergedError, match="nan at step 13.*step_00000010"):
        finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=20))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step_00000010"]


def test_batch_size_must_split_over_micro_batches(tmp_path, tiny_checkpoint, corpus):
    with pytest.raises(UsageError, match="multiple"):
        finetune(_settings(tmp_path, tiny_checkpoint, corpus, batch_size=6, micro_batch_size=4))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "./missing-dir"], "does not exist"),
        (["--mix", "5:1"], "does not divide"),
        (["--mix", "4:0"], "positive number"),
        (["--clip", "2,3"], "--clip"),
        (["--attn-backend", "xformers"], "--attn-backend"),
        (["--attn-backend", "flex", "--compile"], "cannot train on the CPU"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, tiny_checkpoint, corpus, args, message):
    base = [
        "finetune",
        "--init",
        "tiny",
        "--tokenizer",
        str(tiny_checkpoint),
        "--data",
        str(corpus),
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--out",
        str(tmp_path / "r"),
        "--cache-dir",
        str(tmp_path / "c"),
        "-q",
    ]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _launch_two_processes(args, out):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "did_cli"]
    # Two threads per process (a launcher would otherwise pin each worker to one thread).
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(2, os.cpu_count() or 2))}
    done = subprocess.run([*launch, *args, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def _two_process_args(tmp_path, word_data, steps):
    tokenizer, corpus = word_data
    args = ["finetune", "--init", "tiny", "--hidden-dim", "32", "--n-blocks", "2", "--n-heads", "2", "--cond-dim"]
    args += ["16", "--dropout", "0", "--tokenizer", str(tokenizer), "--data", str(corpus), "--seq-len", "64"]
    args += ["--mix", "4:0.5,64:0.5", "--steps", str(steps), "--batch-size", "16", "--micro-batch-size", "8"]
    return args + [
        "--save-every",
        "3",
        "--val-every",
        "0",
        "--val-batches",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        "-q",
    ]


def test_two_process_accelerate_run_keeps_replicas_identical_and_matches_one_process(
    tmp_path, word_data, default_threads
):
    out = tmp_path / "ddp"
    args = _two_process_args(tmp_path, word_data, steps=6)
    _launch_two_processes(args, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["replicas_in_sync"] is True
    state = load_file(str(out / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert any(key.startswith("denoiser.") for key in state)
    # The global batch, its rows and its noise do not depend on the number of processes: one process reaches the
    # same weights up to float summation order (the gradient all-reduce adds in another order).
    single = runner.invoke(app, [*args, "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.stderr
    two = load_file(str(out / "final" / "model.safetensors"))
    one = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
    # Validation runs on the main process over rows and noise fixed by the seed: the same number for those weights.
    validated = json.loads((tmp_path / "single" / "summary.json").read_text())["validation_nelbo"]
    assert validated.keys() == summary["validation_nelbo"].keys() == {"4", "64"}
    for size, value in validated.items():
        assert summary["validation_nelbo"][size] == pytest.approx(value, rel=1e-4)


@pytest.mark.slow
def test_two_process_resume_is_bit_exact(tmp_path, word_data):
    _launch_two_processes(_two_process_args(tmp_path, word_data, steps=6), tmp_path / "straight")
    _launch_two_processes(_two_process_args(tmp_path, word_data, steps=3), tmp_path / "resumed")
    _launch_two_processes([*_two_process_args(tmp_path, word_data, steps=6), "--resume"], tmp_path / "resumed")
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward (a finite loss), infinite backward: what a bf16 overflow in the backward pass looks like."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradients_stop_before_the_step(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    calls = {"n": 0}
    real = setup.nelbo_sum

    def exploding(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return _InfiniteGradient.apply(value) if calls["n"] > 2 * 12 else value  # from step 13

    monkeypatch.setattr(setup, "nelbo_sum", exploding)
    with pytest.raises(TrainingDivergedError, match="gradient norm became .* at step 13.*step_00000010"):
        finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=20))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000010"]


def test_resume_past_the_requested_steps_is_refused(tmp_path, tiny_checkpoint, corpus):
    finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=20))
    with pytest.raises(UsageError, match="past --steps 10"):
        finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=10, resume=True))


def test_per_block_size_clip_is_applied_and_recorded(tmp_path, tiny_checkpoint, corpus):
    result = finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=4, warmup=2, clip={4: (0.5, 1.0)}))
    config = load_model(str(result.final)).config
    assert config.extra["did_training_clip"] == {"4": [0.5, 1.0], "32": [0.001, 1.0]}
    assert (config.sampling_eps_min, config.sampling_eps_max) == (0.5, 1.0)


def _train_losses(tmp_path, tiny_checkpoint, corpus, **overrides):
    settings = _settings(tmp_path, tiny_checkpoint, corpus, steps=3, log_every=1, save_every=100, **overrides)
    result = finetune(settings)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(result.final / "model.safetensors"))
    return [e["loss"] for e in events if e["event"] == "train"], weights


def test_gradient_checkpointing_run_reaches_the_same_weights(tmp_path, tiny_checkpoint, corpus):
    plain_losses, plain = _train_losses(tmp_path / "a", tiny_checkpoint, corpus)
    losses, weights = _train_losses(tmp_path / "b", tiny_checkpoint, corpus, gradient_checkpointing=True)
    assert losses == pytest.approx(plain_losses, abs=1e-6)
    for name, value in plain.items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=1e-6, msg=name)


def test_speed_settings_reach_the_model(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    seen = {}

    def spy(model, **options):
        seen.update(options)
        return optimize(model, **{**options, "compile": False})  # what reaches the model, without compile time

    monkeypatch.setattr(setup, "optimize", spy)
    settings = dict(attn_backend="sdpa", compile=True, gradient_checkpointing=True)
    finetune(_settings(tmp_path, tiny_checkpoint, corpus, steps=1, val_batches=0, **settings))
    assert seen == settings


@pytest.mark.slow
def test_compiled_run_matches_eager_losses(tmp_path, tiny_checkpoint, corpus, monkeypatch):
    # aot_eager: the same dynamo graphs as inductor without its code generation (half a minute per graph on CPU).
    compile_with = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_with(fn, **{**options, "backend": "aot_eager"}))
    eager_losses, _ = _train_losses(tmp_path / "a", tiny_checkpoint, corpus)
    compiled_losses, _ = _train_losses(tmp_path / "b", tiny_checkpoint, corpus, compile=True)
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)

"""What `did finetune` tells its user on stderr: what it does as it starts, a note when a small file leaves nothing to
validate (an error when validation was asked for), and one line for an absurd --steps or a save that fails."""

import json

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from did_cli.cli import app
from did_cli.training import loop, state
from tests.training.conftest import deadline

runner = CliRunner()


def _args(tmp_path, tiny_checkpoint, data, *extra):
    args = ["finetune", "--init", "tiny", "--hidden-dim", "32", "--n-blocks", "2", "--n-heads", "2", "--cond-dim"]
    args += ["16", "--tokenizer", str(tiny_checkpoint), "--data", str(data), "--seq-len", "32", "--steps", "6"]
    args += ["--batch-size", "4", "--micro-batch-size", "4", "--warmup", "2", "--save-every", "3"]
    return args + ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *extra]


def _one_line_error(result, exit_code):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == exit_code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# 1. as the run starts


def test_start_lines_say_what_is_read_the_rows_and_tokens_and_where_checkpoints_go(tmp_path, tiny_checkpoint, corpus):
    result = runner.invoke(app, _args(tmp_path, tiny_checkpoint, corpus, "--val-every", "3", "--log-every", "1"))
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    before_training = lines[: next(i for i, line in enumerate(lines) if line.startswith("step "))]
    data = json.loads((tmp_path / "run" / "settings.json").read_text())["data"]
    out = tmp_path / "run"
    assert before_training == [
        "loading a fresh tiny model",
        f"reading --data {corpus} (tokenised once, then cached)",
        f"data: {data['train_tokens'] // 32:,} training rows of 32 tokens ({data['train_tokens']:,} tokens, "
        f"{6 * 4 / (data['train_tokens'] // 32):.2f} epochs over the run), {data['valid_tokens'] // 32:,} held-out "
        f"rows ({data['valid_tokens']:,} tokens)",
        "training to step 6: 4 rows (128 tokens) per step, 1 process x 1 micro-batch of 4; validating "
        f"{min(data['valid_tokens'] // 32, 8 * 16)} held-out rows every 3 steps and at the end; checkpoints in "
        f"{out / 'checkpoints'} every 3 steps and at the end, metrics in {out / 'metrics.jsonl'}, final weights to "
        f"{out / 'final'}",
    ]
    quiet = runner.invoke(app, _args(tmp_path, tiny_checkpoint, corpus, "--steps", "7", "--resume", "-q"))
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr


# 2. a file too small to hold out one sequence


@pytest.fixture
def small_file(tmp_path):
    """39 documents of 60 characters and a short last one, which the default 1% holds out: 2,346 tokens in all."""
    path = tmp_path / "small.txt"
    path.write_text("\n".join([("the cat sat on the mat " * 3)[:60]] * 39 + ["Tiny."]) + "\n")
    return path


def test_validation_not_asked_for_is_skipped_with_a_note_on_a_small_file(tmp_path, tiny_checkpoint, small_file):
    result = runner.invoke(app, _args(tmp_path, tiny_checkpoint, small_file, "--steps", "2"))
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: the validation split has 6 tokens, fewer than one sequence of 32: this run is not validated "
        "(--valid-data or a larger --val-fraction would validate it)"
    ]
    assert "warning" not in result.stderr and "validation step" not in result.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["validation_nelbo"] == {}


@pytest.mark.parametrize(
    "flags", [["--val-every", "5"], ["--val-fraction", "0.01"], ["--valid-data", "short.txt"]], ids=lambda f: f[0]
)
def test_validation_asked_for_on_a_small_file_is_refused_in_one_line(tmp_path, tiny_checkpoint, small_file, flags):
    (tmp_path / "short.txt").write_text("Short.\n")
    flags = [str(tmp_path / f) if f.endswith(".txt") else f for f in flags]
    result = runner.invoke(app, _args(tmp_path, tiny_checkpoint, small_file, "--steps", "2", *flags, "-q"))
    line = _one_line_error(result, exit_code=2)
    assert "fewer than one sequence of 32" in line and "--val-batches 0" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# 3. absurd values


@pytest.mark.parametrize(
    "flag,value,message",
    [
        (
            "--steps",
            "1000000000000",
            "--steps must be at most 1,000,000,000 (BD3-LM's runs take about 1M), got 1000000",
        ),
        ("--val-batches", "-1", "--val-batches must be non-negative"),
    ],
)
def test_absurd_values_fail_at_once_in_one_line(tmp_path, tiny_checkpoint, corpus, flag, value, message):
    with deadline(60):  # the EMA warning used to loop once per step before --out was even created
        result = runner.invoke(app, _args(tmp_path, tiny_checkpoint, corpus, flag, value))
    assert message in _one_line_error(result, exit_code=2)
    assert not (tmp_path / "run").exists()


# 4. a full disk


def test_a_failed_checkpoint_save_names_the_file_and_the_last_good_checkpoint(
    tmp_path, tiny_checkpoint, corpus, monkeypatch
):
    real = state.save_file

    def disk_full_at_step_6(tensors, path, metadata=None):
        if ".tmp-step_00000006" in path:
            raise SafetensorError("Error while serializing: I/O error")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(state, "save_file", disk_full_at_step_6)
    line = _one_line_error(runner.invoke(app, _args(tmp_path, tiny_checkpoint, corpus, "-q")), exit_code=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert line == (
        "error: cannot write checkpoint step_00000006: Error while serializing: I/O error "
        f"({checkpoints / '.tmp-step_00000006' / 'rng_0.safetensors'}); the last good checkpoint is "
        f"{checkpoints / 'step_00000003'}: continue from it with --resume"
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003"]  # the half-written one is gone
    assert state.damage(checkpoints / "step_00000003") is None


def test_a_failed_final_export_names_the_folder_and_the_last_good_checkpoint_and_resume_exports_it(
    tmp_path, tiny_checkpoint, corpus, monkeypatch
):
    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error")

    monkeypatch.setattr(loop, "save_model", disk_full)
    line = _one_line_error(runner.invoke(app, _args(tmp_path, tiny_checkpoint, corpus, "-q")), exit_code=1)
    out = tmp_path / "run"
    assert line == (
        f"error: cannot write the final weights: Error while serializing: I/O error ({out / 'final'}); the last "
        f"good checkpoint is {out / 'checkpoints' / 'step_00000006'}: continue from it with --resume"
    )
    monkeypatch.undo()
    resumed = runner.invoke(app, _args(tmp_path, tiny_checkpoint, corpus, "--resume", "-q"))
    assert resumed.exit_code == 0, resumed.stderr
    assert (out / "final" / "model.safetensors").exists()

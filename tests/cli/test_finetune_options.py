"""`did finetune` refuses bad options in one line before any work (no model, data or tracker is touched)."""

import pytest
from typer.testing import CliRunner

from did_cli.cli import app
from did_cli.settings import default_micro_batch_size
from did_cli.training import loop

runner = CliRunner()


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if validation lets the command reach the training loop."""
    monkeypatch.setattr(loop, "finetune", lambda *a, **k: pytest.fail("the training loop was started"))


def _invoke(tmp_path, *args):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    base = ["finetune", "--init", "tiny", "--data", str(corpus), "--out", str(tmp_path / "run"), "-q"]
    return runner.invoke(app, [*base, *args])


def _one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "internal error" not in lines[0], result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--lr", "inf"], "--lr must be a positive finite number"),
        (["--lr", "0"], "--lr must be a positive finite number"),
        (["--lr", "-1e-4"], "--lr must be a positive finite number"),
        (["--ema", "2"], "--ema must be in [0, 1)"),
        (["--ema", "1"], "--ema must be in [0, 1)"),
        (["--ema", "-0.1"], "--ema must be in [0, 1)"),
        (["--ema", "nan"], "--ema must be in [0, 1)"),
        (["--dropout", "2"], "--dropout must be in [0, 1)"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--dropout", "nan"], "--dropout must be in [0, 1)"),
        (["--grad-clip", "nan"], "--grad-clip must be positive"),
        (["--report-to", "bogus"], "unknown --report-to 'bogus'; choose from all, aim, tensorboard, wandb"),
        (["--data", "nonexist.txt"], "file not found: --data nonexist.txt"),
        (["--data", "some/dir/corpus"], "file not found: --data some/dir/corpus"),
        (["--valid-data", "held-out.jsonl"], "file not found: --valid-data held-out.jsonl"),
    ],
)
def test_bad_option_is_one_line_before_any_work(tmp_path, no_training, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in _one_line_error(_invoke(tmp_path, *args))


def test_report_to_a_tracker_that_is_not_installed_fails_fast(tmp_path, no_training, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    line = _one_line_error(_invoke(tmp_path, "--report-to", "tensorboard"))
    assert "tensorboard package is not installed" in line


def test_out_or_cache_dir_that_is_a_file_is_refused(tmp_path, no_training):
    (tmp_path / "a-file").write_text("x")
    assert "--out" in _one_line_error(_invoke(tmp_path, "--out", str(tmp_path / "a-file")))
    assert "--cache-dir" in _one_line_error(_invoke(tmp_path, "--cache-dir", str(tmp_path / "a-file")))


@pytest.mark.parametrize(
    "rows,expected",
    [(8, 8), (16, 16), (512, 16), (24, 12), (48, 16), (20, 10), (17, 1), (1, 1), (6, 6), (36, 12)],
)
def test_default_micro_batch_is_the_largest_divisor_up_to_16(rows, expected):
    assert default_micro_batch_size(rows) == expected

"""Progress on a terminal: the start-up line, bars with the time left, and the sampling bar naming its stage."""

import io

import pytest
from rich.console import Console
from rich.progress import TimeRemainingColumn

from did_cli.api import Progress
from did_cli.cli import _progress, _sampling


@pytest.fixture
def terminal(monkeypatch):
    """stderr as a terminal, written to a buffer."""
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    monkeypatch.setattr(_progress, "stderr", console)
    monkeypatch.setattr(_sampling, "stderr", console)
    return console


def test_every_bar_shows_the_time_left():
    bar = _progress.bar("samples")
    assert any(isinstance(column, TimeRemainingColumn) for column in bar.columns)
    assert any(getattr(column, "text_format", None) == "ETA" for column in bar.columns)


def test_the_start_up_line_shows_until_the_first_bar(terminal):
    with _progress.status("starting: importing torch"):
        line = _progress._status[0]
        assert line.tasks[0].description == "starting: importing torch" and line.live.is_started
        _progress.set_status("loading \x1b]0;x\x07model")
        assert line.tasks[0].description == "loading ␛]0;x␇model"  # shown, never obeyed
        _progress.bar("samples")  # a bar takes over the terminal's one live display
        assert not _progress._status and not line.live.is_started
    assert not _progress._status


def test_no_start_up_line_off_a_terminal_or_when_quiet(terminal, monkeypatch):
    with _progress.status("starting", enabled=False):
        assert not _progress._status
    monkeypatch.setattr(_progress, "stderr", Console(file=io.StringIO(), force_terminal=False))
    with _progress.status("starting"):
        assert not _progress._status


def test_the_sampling_bar_names_the_running_stage_and_fills_within_a_batch(terminal):
    with _sampling.Reporter(False, 8) as reporter:
        task = reporter._progress.tasks[0]
        reporter(Progress("draft", 4, 8, tokens_done=31, tokens_total=124, calls=31, batch=4, stages=2))
        assert task.description == "draft (stage 1/2)"
        assert task.completed == pytest.approx(4 + 4 * (31 / 124) / 2) and task.fields["finished"] == 4
        assert task.fields["tokens"] == "batch of 4: 31/124 tokens, 31 calls"
        reporter(Progress("refine", 4, 8, batch=4, stage_index=1, stages=2))  # the refine stage starts
        assert task.description == "refine (stage 2/2)" and task.fields["tokens"] == ""
        assert task.completed == pytest.approx(4 + 4 * 0.5)
        reporter(Progress("refine", 4, 8, tokens_done=32, tokens_total=64, calls=1, batch=4, stage_index=1, stages=2))
        assert task.completed == pytest.approx(4 + 4 * 0.75) and task.fields["finished"] == 4
        assert task.fields["tokens"] == "batch of 4: 32/64 tokens, 1 call"
        reporter(Progress("draft", 8, 8, stages=2))  # the batch is written
        assert task.completed == 8 and task.fields["finished"] == 8


def test_plain_lines_name_the_stage_of_a_several_stage_run(monkeypatch):
    lines = []
    reporter = _sampling.Reporter(False, 8)
    monkeypatch.setattr(reporter, "_lines", lambda message: lines.append(message))
    reporter(Progress("refine", 4, 8, batch=4, stage_index=1, stages=2))
    reporter(Progress("draft", 4, 8))
    assert lines == ["refine (stage 2/2): 4/8 samples finished", "draft: 4/8 samples finished"]

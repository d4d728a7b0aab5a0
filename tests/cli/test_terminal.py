"""The commands as a person runs them: in a terminal (a pseudo-terminal from `script`), interrupted, in pipes.

CI has no terminal, so before these tests nothing noticed that the progress bar took stdout over whenever stderr
was a terminal. Each test runs the real `did` executable in a subprocess.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DID = [sys.executable, "-m", "did_cli"]
needs_script = pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pty")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}


def in_terminal(command: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a shell command line with stdin, stdout and stderr on a pseudo-terminal, as in a person's shell."""
    return subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _did(*args: str) -> str:
    return " ".join(shlex.quote(part) for part in [*DID, *args])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@needs_script
def test_records_reach_a_redirected_stdout_while_the_progress_bar_shows(tiny_checkpoint, tmp_path):
    done = in_terminal(
        _did("draft", "-m", str(tiny_checkpoint), "-n", "3", "--batch-size", "2") + " > out.jsonl", tmp_path
    )
    assert done.returncode == 0, done.stdout
    records = _records(tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == [0, 1, 2]
    assert '"tokens"' not in done.stdout  # nothing of the data reached the screen
    assert "3 samples" in done.stdout  # the summary did (on stderr, the terminal)


@needs_script
@pytest.mark.parametrize("command", ["refine", "generate"])
def test_refine_and_generate_write_their_records_under_a_terminal(tiny_checkpoint, tmp_path, command):
    model = str(tiny_checkpoint)
    if command == "refine":
        subprocess.run(
            [*DID, "draft", "-m", model, "-n", "2", "-q", "--out", str(tmp_path / "d.jsonl")], env=_env(), check=True
        )
        line = _did("refine", "d.jsonl") + " > out.jsonl"
    else:
        line = _did("generate", "-m", model, "-n", "2") + " > out.jsonl"
    done = in_terminal(line, tmp_path)
    assert done.returncode == 0, done.stdout
    assert [r["id"] for r in _records(tmp_path / "out.jsonl")] == [0, 1]


@needs_script
def test_generate_in_a_terminal_shows_start_up_then_each_stage_with_the_time_left(tiny_checkpoint, tmp_path):
    line = _did("generate", "-m", str(tiny_checkpoint), "-n", "4", "--batch-size", "2") + " > out.jsonl"
    done = in_terminal(line, tmp_path)
    assert done.returncode == 0, done.stdout
    screen = done.stdout
    assert "starting: importing torch" in screen or f"loading {tiny_checkpoint}" in screen
    assert "draft (stage 1/2)" in screen and "refine (stage 2/2)" in screen and "ETA" in screen
    assert "note: records are JSON lines" not in screen  # stdout is a file: nothing to explain
    printed = in_terminal(_did("generate", "-m", str(tiny_checkpoint)), tmp_path)  # records on the screen
    assert printed.returncode == 0 and printed.stdout.count("note: records are JSON lines") == 1


@needs_script
def test_the_readme_first_command_works_in_a_terminal(tmp_path):
    # `did generate | did show -` with the embedded did-tiny, as the README's set-up line runs it.
    done = in_terminal(_did("generate") + " | " + _did("show", "-"), tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout
    assert "holds no records" not in done.stdout and "error" not in done.stdout.lower()
    assert "did-tiny" in done.stdout or "confidence" in done.stdout.lower()


@needs_script
def test_show_in_a_terminal_prints_the_sample(tiny_checkpoint, tmp_path):
    subprocess.run(
        [*DID, "draft", "-m", str(tiny_checkpoint), "-q", "--out", str(tmp_path / "d.jsonl")], env=_env(), check=True
    )
    done = in_terminal(_did("show", "d.jsonl"), tmp_path)
    assert done.returncode == 0 and done.stdout.strip(), done.stdout


def test_plain_progress_lines_and_a_summary_reach_stderr_without_a_terminal(tiny_checkpoint, tmp_path):
    env = {**_env(), "DID_PROGRESS_SECONDS": "0"}
    done = subprocess.run(
        [*DID, "draft", "-m", str(tiny_checkpoint), "-n", "2", "--batch-size", "1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0
    assert "draft: 1/2 samples finished" in done.stderr and "2 samples, 62 tokens generated" in done.stderr
    quiet = subprocess.run([*DID, "draft", "-m", str(tiny_checkpoint), "-q"], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {count} lines")


def test_ctrl_c_keeps_out_and_the_finished_samples_and_says_where(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    process = subprocess.Popen(
        [*DID, "draft", "-m", str(tiny_checkpoint), "-n", "400", "--batch-size", "1", "--out", str(out)],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_lines(tmp_path / "out.jsonl.partial", 2, process)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130
    assert "Traceback" not in stderr and "interrupted" in stderr and "out.jsonl.partial" in stderr
    assert out.read_text() == "precious\n"
    assert len(_records(tmp_path / "out.jsonl.partial")) >= 2


def test_ctrl_c_while_starting_up_is_one_line(tmp_path):
    process = subprocess.Popen(
        [*DID, "draft", "-n", "1"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.3)  # still importing
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode in (130, -signal.SIGINT)
    assert "Traceback" not in stderr


def test_help_into_a_closed_pipe_exits_zero():
    done = subprocess.run(
        " ".join([*map(shlex.quote, DID), "--help", "|", "head", "-c", "1", ">/dev/null"]) + "; echo ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "0" and "Traceback" not in done.stderr


def test_version_and_help_do_not_import_torch():
    code = "import sys\nfrom did_cli.cli import build_app\nbuild_app()\nprint('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    version = subprocess.run([*DID, "--version"], env=_env(), capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("did ")


def test_two_runs_writing_the_same_out_refuse_the_second(tiny_checkpoint, tmp_path):
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen(
        [*DID, "draft", "-m", str(tiny_checkpoint), "-n", "400", "--batch-size", "1", "--out", str(out)],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_lines(tmp_path / "out.jsonl.partial", 1, first)
        second = subprocess.run(
            [*DID, "draft", "-m", str(tiny_checkpoint), "--out", str(out)], env=_env(), capture_output=True, text=True
        )
        assert second.returncode != 0
        assert second.stderr.count("\n") == 1 and "another did run is writing" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_every_long_command_prints_plain_progress_without_a_terminal(tiny_checkpoint, tmp_path):
    env = {**_env(), "DID_PROGRESS_SECONDS": "0"}
    subprocess.run(
        [*DID, "draft", "-m", str(tiny_checkpoint), "-n", "2", "-q", "--out", str(tmp_path / "d.jsonl")],
        env=env,
        check=True,
    )
    judge = subprocess.run(
        [*DID, "eval-ppl", str(tmp_path / "d.jsonl"), "--judge", "did-tiny-judge"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert judge.returncode == 0 and judge.stdout == ""
    assert "judge windows" in judge.stderr
    corpus = tmp_path / "text.txt"
    corpus.write_text("the cat sat on the mat and the dog ran to the park\n" * 40)
    nll = subprocess.run(
        [
            *DID,
            "eval-nll",
            "-m",
            str(tiny_checkpoint),
            "--data",
            str(corpus),
            "--block-size",
            "4",
            "--seq-len",
            "32",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert nll.returncode == 0, nll.stderr
    assert nll.stdout == "" and "rows" in nll.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval-nll", "--bogus-flag"], "No such option: --bogus-flag"),
        (["draft", "--length", "abc"], "Invalid value for '--length'"),
        (["bogus-command"], "No such command 'bogus-command'"),
    ],
)
def test_bad_flags_and_values_are_one_line_errors(args, message):
    done = subprocess.run([*DID, *args], env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and message in done.stderr


def test_cli_defaults_name_the_library_defaults():
    # The CLI keeps copies so `--help` needs no torch; they must not drift from the library's.
    from did_cli.checkpoints import DEFAULT_MODEL
    from did_cli.cli import _options
    from did_cli.evaluation.judge import DEFAULT_JUDGE

    assert (_options.DEFAULT_MODEL, _options.DEFAULT_JUDGE) == (DEFAULT_MODEL, DEFAULT_JUDGE)

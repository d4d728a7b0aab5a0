"""Bad input to every command: one line on stderr, a non-zero exit, no traceback, and an existing output untouched.

A table of malformed records is fed to every command that reads records, and a table of bad option values to every
command. Each case runs in-process (CliRunner), so a traceback shows up as a non-SystemExit exception.
"""

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from did_cli.cli import app
from tests.test_records import MALFORMED

runner = CliRunner()
PRECIOUS = "precious output of an earlier run\n"


def _assert_one_line_failure(result) -> None:
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}\n{result.stderr}"
    assert result.exit_code != 0, result.stderr
    message = result.stderr.strip()
    assert message and "\n" not in message, f"not one line: {result.stderr!r}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, message


@pytest.fixture
def inputs(tmp_path: Path, tiny_checkpoint: Path) -> dict[str, Path]:
    good = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-q"]).stdout.strip()
    files = {}
    for number, (line, _) in enumerate(MALFORMED):
        path = tmp_path / f"bad{number}.jsonl"
        path.write_text(good + "\n" + line + "\n")  # a good record first: nothing may be written for it either
        files[f"malformed{number}"] = path
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    files["latin1"] = tmp_path / "latin1.jsonl"
    (tmp_path / "empty.jsonl").write_text("\n")
    files["empty"] = tmp_path / "empty.jsonl"
    files["directory"] = tmp_path
    files["missing"] = tmp_path / "missing.jsonl"
    return files


RECORD_READERS = [
    ["refine", "{input}", "--out", "{out}"],
    ["show", "{input}", "--index", "-1"],
    ["eval-ppl", "{input}", "--judge", "did-tiny-judge", "--json", "{out}"],
]


@pytest.mark.parametrize("command", RECORD_READERS, ids=lambda c: c[0])
def test_malformed_record_files_fail_in_one_line_and_keep_outputs(command, inputs, tmp_path, tiny_checkpoint):
    out = tmp_path / "precious.out"
    for name, path in inputs.items():
        out.write_text(PRECIOUS)
        args = [part.format(input=path, out=out) for part in command]
        if command[0] == "refine":
            args += ["-m", str(tiny_checkpoint)]
        result = runner.invoke(app, args)
        _assert_one_line_failure(result)
        if name == "directory":
            assert "directory" in result.stderr or "folder" in result.stderr, result.stderr
        assert out.read_text() == PRECIOUS, f"{name} changed the output"
        assert not out.with_name(out.name + ".partial").exists()


def _prompt_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n \n")
    return {"latin1": tmp_path / "latin1.txt", "blank": tmp_path / "blank.txt", "dir": tmp_path}


BAD_SAMPLING_OPTIONS = [
    ["--temperature", "inf"],
    ["--temperature", "nan"],
    ["--temperature", "0"],
    ["--top-p", "nan"],
    ["--top-p", "2"],
    ["--num-samples", "0"],
    ["--batch-size", "0"],
    ["--length", "1"],
    ["--length", "100000"],
    ["--order", "bogus"],
    ["--order", "first-hitting", "--steps-per-block", "2"],
    ["--order", "confidence", "--steps-per-block", "2"],
    ["--steps-per-block", "0"],
    ["--steps-per-block", "2", "--tokens-per-call", "2"],
    ["--tokens-per-call", "0"],
    ["--device", "bogus"],
    ["--dtype", "int8"],
    ["--prompt", ""],
    ["--prompt", "x" * 200],
    ["--prompt-file", "{latin1}"],
    ["--prompt-file", "{blank}"],
    ["--prompt-file", "{dir}"],
    ["--prompt-file", "{missing}"],
    ["--out", "{dir}"],
    ["--out", "{under_file}"],
    ["--out", "{loop}"],
    ["--batch-size", "100000000000000000000"],  # 1e20: as an integer (written 1e20 it is a usage error)
    ["--prompt", "\udcff\udcfe"],  # $'\xff\xfe' in a shell: bytes that are not UTF-8
    ["--block-size", "0"],
    ["--dtype", "bogus"],
]


@pytest.mark.parametrize("command", ["draft", "generate"])
@pytest.mark.parametrize("option", BAD_SAMPLING_OPTIONS, ids=lambda o: " ".join(o)[:40])
def test_bad_sampling_options_fail_in_one_line(command, option, tiny_checkpoint, tmp_path):
    files = {
        **_prompt_files(tmp_path),
        "missing": tmp_path / "nope.txt",
        "under_file": tmp_path / "latin1.txt" / "out.jsonl",
        "loop": tmp_path / "loop1",
    }
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    out = tmp_path / "precious.jsonl"
    out.write_text(PRECIOUS)
    args = [part.format(**files) for part in option]
    if "--out" not in args:
        args += ["--out", str(out)]
    result = runner.invoke(app, [command, "-m", str(tiny_checkpoint), *args])
    _assert_one_line_failure(result)
    assert out.read_text() == PRECIOUS


BAD_REFINE_OPTIONS = [
    ["--gamma", "nan"],
    ["--gamma", "-0.1"],
    ["--remask", "bogus"],
    ["--block-size", "0"],
    ["--block-size", "5"],
    ["--model", "/nonexistent/model"],
]


@pytest.mark.parametrize("option", BAD_REFINE_OPTIONS, ids=lambda o: " ".join(o))
def test_bad_refine_options_fail_in_one_line(option, tiny_checkpoint, tmp_path):
    drafts = tmp_path / "d.jsonl"
    assert runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-q", "--out", str(drafts)]).exit_code == 0
    out = tmp_path / "precious.jsonl"
    out.write_text(PRECIOUS)
    result = runner.invoke(app, ["refine", str(drafts), *option, "--out", str(out)])
    _assert_one_line_failure(result)
    assert out.read_text() == PRECIOUS


def test_a_bad_second_prompt_fails_before_any_sample(tiny_checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab\n" + "x" * 200 + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(PRECIOUS)
    result = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "--prompt-file", str(prompts), "--out", str(out)])
    _assert_one_line_failure(result)
    assert "prompt 2" in result.stderr and out.read_text() == PRECIOUS
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_nan_weights_never_reach_a_record(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    broken.mkdir()
    for item in tiny_checkpoint.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("weight") and weights[k].ndim == 2)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors")
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["draft", "-m", str(broken), "--out", str(out)])
    _assert_one_line_failure(result)
    assert not out.exists() or all(json.loads(line) for line in out.read_text().splitlines())


# --- Closed streams and absurd sizes: one line that says what the user did wrong, never "internal error" ----------

DID = [sys.executable, "-m", "did_cli"]


def _closing(fd: int):
    return lambda: os.close(fd)


CLOSED_STREAMS = [
    (["refine"], 0, "stdin is closed"),  # did refine <&-
    (["show", "-"], 0, "stdin is closed"),  # did show - <&-
    (["eval-ppl", "-", "--judge", "did-tiny-judge"], 0, "stdin is closed"),  # did eval-ppl - <&-
    (["show", "{drafts}", "--html", "-"], 1, "stdout is closed"),  # did show f --html - >&-
    (["show", "{drafts}"], 1, "stdout is closed"),  # did show f >&-
    (["eval-ppl", "{drafts}", "--judge", "did-tiny-judge", "--json", "-"], 1, "stdout is closed"),
]


@pytest.mark.parametrize("args,closed,message", CLOSED_STREAMS, ids=lambda c: str(c)[:40])
def test_a_closed_stdin_or_stdout_is_one_line_naming_it(args, closed, message, tiny_checkpoint, tmp_path):
    drafts = tmp_path / "d.jsonl"
    drafts.write_text(runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-q"]).stdout)
    done = subprocess.run(
        [*DID, *(part.format(drafts=drafts) for part in args)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.PIPE if closed != 0 else subprocess.DEVNULL,
        stdout=subprocess.PIPE if closed != 1 else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_closing(closed),
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr and "internal error" not in done.stderr


@pytest.mark.skipif(
    Path("/proc/sys/vm/overcommit_memory").exists() and Path("/proc/sys/vm/overcommit_memory").read_text() == "1\n",
    reason="with overcommit always on, a 93 TiB allocation would succeed and be killed later",
)
def test_absurd_noise_draws_are_one_line_saying_what_to_lower(tiny_checkpoint, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat\n" * 40)
    args = ["eval-nll", "-m", str(tiny_checkpoint), "--data", str(corpus), "--block-size", "4"]
    result = runner.invoke(app, [*args, "--noise-draws", "100000000000", "--seq-len", "32", "--device", "cpu"])
    _assert_one_line_failure(result)
    assert "out of memory" in result.stderr and "--noise-draws" in result.stderr


def test_an_unknown_dtype_lists_every_dtype_did_accepts(tiny_checkpoint):
    for command in (["draft"], ["eval-nll", "-m", str(tiny_checkpoint), "--data", "x"], ["sweep", "-m", "x"]):
        result = runner.invoke(app, [*command, "--dtype", "bogus"])
        _assert_one_line_failure(result)
        assert "float32, bfloat16 or float16" in result.stderr, result.stderr


# --- Outputs that are inputs: refused before anything is written -------------------------------------------------


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat and the dog ran to the park\n" * 40)
    return corpus


OUTPUT_IS_INPUT = [
    ["eval-nll", "-m", "{model}", "--data", "{corpus}", "--json", "{corpus}"],
    ["eval-nll", "-m", "{model}", "--data", "{corpus}", "--per-sequence", "{corpus}"],
    ["eval-nll", "-m", "{model}", "--data", "{corpus}", "--json", "{link}"],  # a link to the input
    ["eval-nll", "-m", "{model}", "--data", "{folder}", "--json", "{corpus}"],  # a file of the input folder
    ["eval-nll", "-m", "{model}", "--data", "{corpus}", "--json", "{out}", "--per-sequence", "{out}"],
    ["show", "{drafts}", "--html", "{drafts}"],
    ["draft", "-m", "{model}", "--prompt-file", "{corpus}", "--out", "{corpus}"],
    ["generate", "-m", "{model}", "--prompt-file", "{corpus}", "--out", "{link}"],
    ["refine", "{drafts}", "-m", "{model}", "--out", "{drafts}"],
    ["eval-ppl", "{drafts}", "--judge", "did-tiny-judge", "--per-sample", "{drafts}"],
    ["eval-ppl", "{drafts}", "--judge", "did-tiny-judge", "--reference", "{corpus}", "--json", "{corpus}"],
]


@pytest.mark.parametrize("command", OUTPUT_IS_INPUT, ids=lambda c: " ".join(c)[:60])
def test_every_command_refuses_an_output_that_is_one_of_its_inputs(command, tiny_checkpoint, tmp_path):
    corpus = _corpus(tmp_path)
    drafts = tmp_path / "d.jsonl"
    drafts.write_text(runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-q"]).stdout)
    (tmp_path / "link.txt").symlink_to(corpus)
    names = {"model": tiny_checkpoint, "corpus": corpus, "drafts": drafts, "link": tmp_path / "link.txt"}
    names.update(folder=tmp_path, out=tmp_path / "out.json")
    before = {path: path.read_bytes() for path in (corpus, drafts)}
    result = runner.invoke(app, [part.format(**names) for part in command])
    _assert_one_line_failure(result)
    assert "is an input" in result.stderr or "input folder" in result.stderr or "same file" in result.stderr
    assert {path: path.read_bytes() for path in before} == before
    assert not (tmp_path / "out.json").exists()


# --- Hostile text: shown on the terminal, never obeyed ------------------------------------------------------------

HOSTILE = [
    "\x1b[2J\x1b]0;PWNED\x07",  # clear the screen, set the window title
    "\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\",  # a fake hyperlink
    "\x1b]0;open OSC that never ends",  # swallows what follows on some terminals
    "\x9b2J",  # C1 CSI: an escape sequence in one character
    "ok\rFAKE",  # a carriage return overwrites the line
    "ab\b\bXY",  # backspaces overwrite characters
    "nul\x00byte",
    "lone \udcff\udcfe surrogates",  # undecodable bytes of a file name
    "\u202eevil\u202c.jsonl",  # a right-to-left override reorders what is shown
    "two\nlines\u2028three",
]


def _raw_controls(text: str) -> list[str]:
    """Characters a terminal would act on: controls (a newline only at the end of a line), surrogates, bidi."""
    return [
        c
        for c in text
        if (unicodedata.category(c) in ("Cc", "Cs") and c != "\n")
        or "\u202a" <= c <= "\u202e"
        or "\u2066" <= c <= "\u2069"
        or c in "\u2028\u2029"
    ]


def _file_name(hostile: str) -> str:
    return hostile.replace("\x00", "").replace("/", "")  # what a file name can hold


HOSTILE_PATHS = {
    # A record naming a model that does not exist: `did refine` names it in the error.
    "record model name": lambda h, t, m: ["refine", str(t["record"]), "--out", str(t["out"])],
    "missing refine input": lambda h, t, m: ["refine", str(t["dir"] / _file_name(h)), "--out", str(t["out"])],
    "missing show input": lambda h, t, m: ["show", str(t["dir"] / _file_name(h))],
    "missing eval-ppl input": lambda h, t, m: ["eval-ppl", str(t["dir"] / _file_name(h)), "--json", str(t["out"])],
    "missing model": lambda h, t, m: ["draft", "-m", h, "--out", str(t["out"])],
    "missing data": lambda h, t, m: ["eval-nll", "-m", str(m), "--data", str(t["dir"] / _file_name(h))],
    "bad dtype": lambda h, t, m: ["eval-nll", "-m", str(m), "--dtype", h, "--json", str(t["out"])],
}


@pytest.mark.parametrize("path", HOSTILE_PATHS)
@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: ascii(h)[:30])
def test_hostile_text_in_messages_is_shown_never_obeyed(hostile, path, tiny_checkpoint, tmp_path):
    record = json.loads(runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-q"]).stdout)
    for stage in record["stages"]:
        stage["model"] = {"name": hostile, "path": hostile}
    record["model"], record["tokenizer"] = {"name": hostile, "path": hostile}, {"name": hostile}
    files = {"dir": tmp_path, "record": tmp_path / "hostile.jsonl", "out": tmp_path / "precious.out"}
    files["record"].write_text(json.dumps(record) + "\n")
    files["out"].write_text(PRECIOUS)
    result = runner.invoke(app, HOSTILE_PATHS[path](hostile, files, tiny_checkpoint))
    _assert_one_line_failure(result)
    assert _raw_controls(result.stderr) == [], ascii(result.stderr)
    assert files["out"].read_text() == PRECIOUS


@pytest.mark.parametrize("args", [["draft", "--length", "{h}"], ["draft", "--{h}"], ["{h}"]], ids=str)
@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: ascii(h)[:30])
def test_hostile_text_in_usage_errors_is_shown_never_obeyed(hostile, args, monkeypatch, capsys):
    from did_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["did", *(part.format(h=hostile) for part in args)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, ascii(err)
    assert _raw_controls(err) == [], ascii(err)


TABLE_NAME = "".join(_file_name(h) for h in HOSTILE[:1] + HOSTILE[3:]) + ".jsonl"  # every kind in one file name


def test_hostile_file_and_model_names_in_tables_are_shown_never_obeyed(tiny_checkpoint, tmp_path):
    drafts = tmp_path / TABLE_NAME
    drafts.write_text(runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "2", "-q"]).stdout)
    for width in ("200", "30"):  # at 30 columns the name is cut: no half escape sequence may remain
        result = runner.invoke(app, ["eval-ppl", str(drafts), "--judge", "did-tiny-judge"], env={"COLUMNS": width})
        assert result.exit_code == 0, result.stderr
        assert _raw_controls(result.stderr) == [] and "␛" in result.stderr, ascii(result.stderr)
    model = tmp_path / TABLE_NAME.removesuffix(".jsonl").replace("\udcff\udcfe", "")  # safetensors needs UTF-8 paths
    shutil.copytree(tiny_checkpoint, model)
    corpus = _corpus(tmp_path)
    args = ["eval-nll", "-m", str(model), "--data", str(corpus), "--block-size", "4", "--seq-len", "32"]
    result = runner.invoke(app, [*args, "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    assert _raw_controls(result.stderr) == [] and "␛" in result.stderr, ascii(result.stderr)


def test_hostile_notes_and_events_are_shown_never_obeyed(capsys):
    from did_cli.ablation.run import SweepEvent
    from did_cli.cli._progress import say
    from did_cli.cli.finetune import _Printer
    from did_cli.cli.sweep import _events

    hostile = "".join(HOSTILE)
    say(f"note: {hostile}")
    with _events(quiet=False) as on_event:
        on_event(SweepEvent("note", hostile))
    printer = _Printer(quiet=False, steps=1)
    printer({"event": "warning", "message": hostile})
    printer({"event": "checkpoint", "path": hostile})
    printer({"event": "done", "steps": 1, "final": hostile})
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 5, ascii(captured.err)
    assert _raw_controls(captured.err) == [] and "␛" in captured.err, ascii(captured.err)


def test_out_of_memory_is_recognised_by_its_message_without_torch():
    from did_cli.cli._errors import out_of_memory

    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 102400000000000 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert out_of_memory(cpu) == "tried to allocate 93.1 TiB"
    cuda = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 ...")
    assert out_of_memory(cuda) == "tried to allocate 20.00 GiB"
    assert out_of_memory(MemoryError()) == "an allocation failed"
    assert out_of_memory(RuntimeError("shapes do not match")) is None

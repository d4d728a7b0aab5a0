"""Bad input to every command: one line on stderr, a non-zero exit, no traceback, and an existing output untouched.

A table of malformed records is fed to every command that reads records, and a table of bad option values to every
command. Each case runs in-process (CliRunner), so a traceback shows up as a non-SystemExit exception.
"""

import json
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
]


@pytest.mark.parametrize("command", ["draft", "generate"])
@pytest.mark.parametrize("option", BAD_SAMPLING_OPTIONS, ids=lambda o: " ".join(o)[:40])
def test_bad_sampling_options_fail_in_one_line(command, option, tiny_checkpoint, tmp_path):
    files = {
        **_prompt_files(tmp_path),
        "missing": tmp_path / "nope.txt",
        "under_file": tmp_path / "latin1.txt" / "out.jsonl",
    }
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

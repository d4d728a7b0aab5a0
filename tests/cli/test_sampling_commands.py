import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from did_cli.cli import app

runner = CliRunner()


def _lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("draft", "refine", "generate"):
        assert command in result.stdout


def test_draft_writes_one_record_per_sample_with_provenance(tiny_checkpoint):
    result = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "3", "--batch-size", "2", "--seed", "4"])
    assert result.exit_code == 0, result.stderr
    records = _lines(result.stdout)
    assert [r["id"] for r in records] == [0, 1, 2]
    record = records[0]
    assert len(record["tokens"]) == len(record["confidence"]) == 32
    assert record["prompt_len"] == 1 and record["seed"] == 4
    assert record["stages"][0]["kind"] == "draft" and record["stages"][0]["nfes"] == 31
    assert record["model"]["sha256"] and record["tokenizer"]["vocab_size"] == 68
    assert record["versions"]["did"] and record["versions"]["torch"]
    assert record["draft_tokens"] == record["tokens"]
    assert isinstance(record["text"], str) and len(record["text"]) > 0


def test_batch_size_does_not_change_cli_samples(tiny_checkpoint):
    # The README's guarantee, exactly: tokens identical, confidences equal to float32 rounding (1e-5).
    one = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "4", "--batch-size", "1"])
    four = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "4", "--batch-size", "4"])
    assert [r["tokens"] for r in _lines(one.stdout)] == [r["tokens"] for r in _lines(four.stdout)]
    for a, b in zip(_lines(one.stdout), _lines(four.stdout), strict=True):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5, rel=1e-5)


def test_each_stage_records_the_model_dtype_and_device_that_ran_it(tiny_checkpoint, tmp_path):
    drafts = tmp_path / "d.jsonl"
    runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "1", "--out", str(drafts)])
    result = runner.invoke(app, ["refine", str(drafts), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.stderr
    draft_stage, refine_stage = _lines(result.stdout)[0]["stages"]
    assert draft_stage["dtype"] == "float32" and refine_stage["dtype"] == "bfloat16"
    assert refine_stage["device"] == "cpu" and refine_stage["model"]["path"] == str(tiny_checkpoint.resolve())


def test_refine_without_model_uses_the_records_model_from_another_directory(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_checkpoint, tmp_path / "runs" / "final")
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["draft", "-m", "runs/final", "--out", "d.jsonl"]).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["refine", "../d.jsonl"])
    assert result.exit_code == 0, result.stderr
    record = _lines(result.stdout)[0]
    assert record["model"]["name"] == "runs/final"
    assert record["stages"][-1]["model"]["path"] == str((tmp_path / "runs" / "final").resolve())


def test_draft_streams_its_work_without_building_every_job(tiny_checkpoint):
    import tracemalloc

    from did_cli import api
    from did_cli.checkpoints import load_model, load_tokenizer
    from did_cli.settings import DraftSettings

    model = load_model(str(tiny_checkpoint))
    tokenizer = load_tokenizer(model)
    tracemalloc.start()
    stream = api.draft(model, tokenizer, DraftSettings(length=8), num_samples=10**8, batch_size=2)
    first = next(stream)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first.id == 0 and peak < 20 * 2**20  # a list of 10**8 jobs alone would take gigabytes


def test_no_kv_cache_flag_gives_the_same_tokens(tiny_checkpoint):
    cached = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "2", "--batch-size", "2"])
    uncached = runner.invoke(
        app, ["draft", "-m", str(tiny_checkpoint), "-n", "2", "--batch-size", "2", "--no-kv-cache"]
    )
    assert [r["tokens"] for r in _lines(cached.stdout)] == [r["tokens"] for r in _lines(uncached.stdout)]


def test_refine_reads_a_file_and_only_changes_remasked_positions(tiny_checkpoint, tmp_path):
    drafts = tmp_path / "d.jsonl"
    runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "2", "--out", str(drafts)])
    result = runner.invoke(app, ["refine", str(drafts), "-m", str(tiny_checkpoint), "--gamma", "0.25"])
    assert result.exit_code == 0, result.stderr
    for before, after in zip(_lines(drafts.read_text()), _lines(result.stdout), strict=True):
        stage = after["stages"][-1]
        assert stage["kind"] == "refine" and len(stage["remasked"]) == 8 and stage["gamma"] == 0.25
        changed = {i for i, (a, b) in enumerate(zip(before["tokens"], after["tokens"], strict=True)) if a != b}
        assert changed <= set(stage["remasked"])
        assert after["draft_tokens"] == before["tokens"]


def test_prompt_is_kept_at_the_start(tiny_checkpoint):
    result = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "--prompt", "Hello there"])
    record = _lines(result.stdout)[0]
    assert record["prompt"] == "Hello there" and record["prompt_len"] == 12
    assert record["confidence"][:12] == [1.0] * 12


def test_generate_equals_draft_piped_into_refine(tiny_checkpoint, tmp_path):
    model = str(tiny_checkpoint)
    gen = runner.invoke(
        app, ["generate", "-m", model, "-n", "3", "--stages", "4,32", "--gamma", "0.5", "--batch-size", "2"]
    )
    assert gen.exit_code == 0, gen.stderr
    drafts = tmp_path / "d.jsonl"
    runner.invoke(app, ["draft", "-m", model, "-n", "3", "--out", str(drafts)])
    refined = runner.invoke(app, ["refine", str(drafts), "-m", model, "--gamma", "0.5"])
    assert [r["tokens"] for r in _lines(gen.stdout)] == [r["tokens"] for r in _lines(refined.stdout)]
    assert [len(r["stages"]) for r in _lines(gen.stdout)] == [2, 2, 2]


def test_generate_with_three_stages(tiny_checkpoint):
    gen = runner.invoke(app, ["generate", "-m", str(tiny_checkpoint), "--stages", "2,8,32", "--gamma", "0.5,0.25"])
    assert gen.exit_code == 0, gen.stderr
    stages = _lines(gen.stdout)[0]["stages"]
    assert [s["block_size"] for s in stages] == [2, 8, 32]
    assert [len(s.get("remasked", [])) for s in stages] == [0, 16, 8]


@pytest.mark.parametrize(
    "args,message",
    [
        (["draft", "--block-size", "5"], "does not divide the length 32"),
        (["draft", "--length", "64"], "exceeds the model's model_length"),
        (["draft", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "--gamma", "0.5,0.5"], "2 values for 1 refine stages"),
        (["generate", "--stages", "4,x"], "--stages must be"),
        (["refine", "--gamma", "1.5"], "gamma must be in [0, 1]"),
    ],
)
def test_bad_options_are_one_line_errors_with_exit_code_2(tiny_checkpoint, args, message):
    result = runner.invoke(app, [*args, "-m", str(tiny_checkpoint)], input="")
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_missing_model_is_a_one_line_error():
    result = runner.invoke(app, ["draft", "-m", "/no/such/model"])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_malformed_and_empty_inputs_name_the_line(tiny_checkpoint, tmp_path):
    good = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint)]).stdout.strip()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + good[: len(good) // 2] + "\n")
    result = runner.invoke(app, ["refine", str(bad), "-m", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "line 2" in result.stderr
    assert _lines(result.stdout) == []  # a file is checked whole before any work, so nothing half-done is written
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = runner.invoke(app, ["refine", str(empty), "-m", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "holds no records" in result.stderr


def test_refine_refuses_records_of_another_model_unless_forced(tiny_checkpoint, tmp_path):
    record = json.loads(runner.invoke(app, ["draft", "-m", str(tiny_checkpoint)]).stdout)
    record["model"]["sha256"] = "0" * 64
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps(record) + "\n")
    result = runner.invoke(app, ["refine", str(path), "-m", str(tiny_checkpoint)])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert runner.invoke(app, ["refine", str(path), "-m", str(tiny_checkpoint), "--force"]).exit_code == 0


def test_draft_pipe_refine_pipe_refine_end_to_end_in_subprocesses(tiny_checkpoint):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    did = [sys.executable, "-m", "did_cli"]
    model = ["-m", str(tiny_checkpoint)]
    draft = subprocess.Popen([*did, "draft", *model, "-n", "3"], stdout=subprocess.PIPE, env=env)
    first = subprocess.Popen([*did, "refine", *model], stdin=draft.stdout, stdout=subprocess.PIPE, env=env)
    second = subprocess.run(
        [*did, "refine", *model, "--remask", "random", "--gamma", "0.25"],
        stdin=first.stdout,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    records = _lines(second.stdout)
    assert len(records) == 3
    assert [s["kind"] for s in records[0]["stages"]] == ["draft", "refine", "refine"]
    assert [len(s.get("remasked", [])) for s in records[0]["stages"]] == [0, 16, 8]


def test_closed_pipe_exits_quietly(tiny_checkpoint):
    command = f"{sys.executable} -m did_cli draft -m {tiny_checkpoint} -n 200 | head -1"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert len(result.stdout.splitlines()) == 1


def test_refine_refuses_to_overwrite_its_input_and_failures_keep_existing_outputs(tiny_checkpoint, tmp_path):
    drafts = tmp_path / "d.jsonl"
    runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "-n", "2", "--out", str(drafts)])
    before = drafts.read_text()
    result = runner.invoke(app, ["refine", str(drafts), "-m", str(tiny_checkpoint), "--out", str(drafts)])
    assert result.exit_code == 2 and "is an input" in result.stderr
    assert drafts.read_text() == before
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(app, ["refine", str(empty), "-m", str(tiny_checkpoint), "--out", str(drafts)])
    assert result.exit_code == 2 and drafts.read_text() == before


def test_unknown_device_is_a_usage_error(tiny_checkpoint):
    result = runner.invoke(app, ["draft", "-m", str(tiny_checkpoint), "--device", "gpu"])
    assert result.exit_code == 2 and "unknown device" in result.stderr


def test_a_tiny_temperature_drafts_greedily_and_refine_accepts_the_records(tiny_checkpoint, tmp_path):
    """--temperature 5e-324 used to write [MASK] everywhere (rc 0), and did refine then refused did's own output."""
    drafts = tmp_path / "d.jsonl"
    args = ["draft", "-m", str(tiny_checkpoint), "-n", "2", "-q", "--out", str(drafts), "--temperature", "5e-324"]
    assert runner.invoke(app, args).exit_code == 0
    records = [json.loads(line) for line in drafts.read_text().splitlines()]
    assert all(68 not in r["tokens"] and min(r["confidence"]) > 0 for r in records)
    refined = runner.invoke(app, ["refine", str(drafts), "-q", "--temperature", "1e-310"])
    assert refined.exit_code == 0, refined.stderr


@pytest.mark.parametrize("command", ["draft", "generate", "refine"])
def test_records_for_a_terminal_come_with_one_note_on_reading_them(tiny_checkpoint, tmp_path, monkeypatch, command):
    from did_cli.cli import _sampling

    model = str(tiny_checkpoint)
    drafts = tmp_path / "d.jsonl"
    assert runner.invoke(app, ["draft", "-m", model, "-n", "2", "-q", "--out", str(drafts)]).exit_code == 0
    args = ["refine", str(drafts), "-m", model] if command == "refine" else [command, "-m", model, "-n", "2"]
    monkeypatch.setattr(_sampling, "stdout_is_terminal", lambda: True)
    shown = runner.invoke(app, args)
    assert shown.exit_code == 0, shown.stderr
    assert shown.stderr.count(_sampling.READING_NOTE) == 1
    assert "| did show -" in _sampling.READING_NOTE and "--text" in _sampling.READING_NOTE
    assert "--out FILE" in _sampling.READING_NOTE
    saved = runner.invoke(app, [*args, "--out", str(tmp_path / "out.jsonl")])
    quiet = runner.invoke(app, [*args, "-q"])
    assert saved.exit_code == quiet.exit_code == 0
    assert _sampling.READING_NOTE not in saved.stderr and quiet.stderr == ""

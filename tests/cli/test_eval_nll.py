import json
import os
import random
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from did_cli.cli import app
from tests.conftest import CHARS

runner = CliRunner()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(1)
    folder = tmp_path_factory.mktemp("nll-data")
    lines = ["".join(rng.choice(CHARS[:50]) for _ in range(rng.randint(10, 60))) for _ in range(30)]
    path = folder / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


def test_help_lists_the_options():
    result = runner.invoke(app, ["eval-nll", "--help"])
    assert result.exit_code == 0
    for option in ("--block-size", "--noise-draws", "--preset", "--no-wrap", "--json", "--per-sequence", "--clip"):
        assert option in result.stdout


def test_two_models_side_by_side_with_json_and_per_sequence(tmp_path, tiny_checkpoint, text_file):
    report, per_sequence = tmp_path / "nll.json", tmp_path / "rows.jsonl"
    args = ["eval-nll", "-m", str(tiny_checkpoint), "-m", str(tiny_checkpoint) + "/", "--data", str(text_file)]
    args += ["--block-size", "1,4,64", "--num-samples", "5", "--noise-draws", "2", "--device", "cpu"]
    args += ["--json", str(report), "--per-sequence", str(per_sequence)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""  # data goes to files; the table goes to stderr
    assert "NELBO" in result.stderr and "PPL" in result.stderr

    body = json.loads(report.read_text())
    rows = body["results"]
    assert [(r["model"].rstrip("/"), r["block_size"]) for r in rows] == [
        (str(tiny_checkpoint), b) for b in (1, 4, 32)
    ] * 2
    for row in rows:
        assert row["sequences"] == 5 and row["tokens"] == 5 * 31 and row["stderr"] > 0
        assert row["ppl_bound"] == pytest.approx(2.718281828 ** row["nelbo"], rel=1e-6)
    assert rows[0]["nelbo"] == rows[3]["nelbo"]  # same weights, same rows, same noise
    data = next(iter(body["data"].values()))
    assert data["layout"] == "wrap" and len(data["fingerprint"]) == 16 and data["seq_len"] == 32
    assert body["settings"]["noise_draws"] == 2 and body["settings"]["clip"] is None
    assert body["versions"]["torch"]
    lines = [json.loads(line) for line in per_sequence.read_text().splitlines()]
    assert len(lines) == 2 * 3 * 5
    first = [line for line in lines if line["block_size"] == 4][:5]
    assert sum(line["nll"] for line in first) / sum(line["tokens"] for line in first) == pytest.approx(rows[1]["nelbo"])


def test_json_to_stdout_is_the_only_stdout(tiny_checkpoint, text_file):
    args = ["eval-nll", "-m", str(tiny_checkpoint), "--data", str(text_file), "--block-size", "8", "--no-wrap"]
    result = runner.invoke(app, [*args, "--num-samples", "3", "--json", "-", "--quiet"])
    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["results"][0]["sequences"] == 3 and next(iter(body["data"].values()))["layout"] == "document"
    assert result.stderr == ""


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--preset", "wikitext-3"], "unknown preset 'wikitext-3'"),
        (["--data", "EMPTY"], "holds no text"),
        (["--data", "DATA", "--seq-len", "64"], "--seq-len 64 exceeds the model's length 32"),
        (["--data", "DATA", "--block-size", "5"], "does not divide"),
        (["--data", "DATA", "--clip", "auto"], "training option"),
        ([], "exactly one of --data and --preset"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_checkpoint, text_file, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    extra = [str(empty) if a == "EMPTY" else str(text_file) if a == "DATA" else a for a in extra]
    result = runner.invoke(app, ["eval-nll", "-m", str(tiny_checkpoint), *extra])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path, tiny_checkpoint, text_file):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "did_cli"]
    args = ["eval-nll", "-m", str(tiny_checkpoint), "--data", str(text_file), "--block-size", "1,4,32", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.json"
    done = subprocess.run([*launch, *args, "--json", str(two)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    one = runner.invoke(app, [*args, "--json", "-"])
    assert one.exit_code == 0, one.stderr
    single, double = json.loads(one.stdout), json.loads(two.read_text())
    assert double["settings"]["processes"] == 2
    for a, b in zip(single["results"], double["results"], strict=True):
        assert (a["block_size"], a["sequences"], a["tokens"]) == (b["block_size"], b["sequences"], b["tokens"])
        assert a["nelbo"] == pytest.approx(b["nelbo"], rel=1e-9)


def test_preset_rows_use_the_zero_shot_layout(monkeypatch, tiny_checkpoint, char_tokenizer):
    import datasets

    lines = [" the cat @-@ like thing . \n", " = = a heading = = \n"] * 20
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": lines}))
    args = ["eval-nll", "-m", str(tiny_checkpoint), "--preset", "wikitext-103", "--block-size", "4", "--json", "-"]
    result = runner.invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.stderr
    data = next(iter(json.loads(result.stdout)["data"].values()))
    assert data["layout"] == "bos-eos" and data["source"]["preset"] == "wikitext-103"
    clean = [" the cat-like thing.\n", " == a heading ==\n"] * 20  # detokenised by hand, document by document
    text_tokens = sum(len(char_tokenizer(text, add_special_tokens=False)["input_ids"]) for text in clean)
    assert data["rows"] == text_tokens // 30  # [BOS] + L - 2 text tokens + [EOS] per row, no EOS between documents

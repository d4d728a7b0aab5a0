"""`did eval-ppl --reference`: a MAUVE column and JSON value per file, a one-line note without mauve-text."""

from __future__ import annotations

import json
import random
import sys

import pytest
from typer.testing import CliRunner

from did_cli.cli import app
from did_cli.evaluation.mauve import few_texts_note, mauve_available
from tests.evaluation.tiny_judge import save_tiny_judge

runner = CliRunner()
NOTE = "note: MAUVE skipped: mauve-text is not installed (pip install 'did[mauve]')"
WORDS = "the cat dog sat ran on a mat far fast slow red big old new tree house under over".split()


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    return str(save_tiny_judge(tmp_path_factory.mktemp("judge") / "tiny-judge"))


@pytest.fixture
def files(tmp_path, monkeypatch):
    """samples.jsonl (24 varied texts), repeated.txt (one sentence 24 times), reference.txt (30 varied texts)."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "."

    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"text": text()}) + "\n" for _ in range(24)))
    (tmp_path / "repeated.txt").write_text("the cat sat on the mat.\n" * 24)
    (tmp_path / "reference.txt").write_text("".join(text() + "\n" for _ in range(30)))
    return ["samples.jsonl", "repeated.txt"]


def _run(judge_folder, *args):
    return runner.invoke(app, ["eval-ppl", *args, "--judge", judge_folder, "--json", "-"])


def test_help_lists_reference():
    assert "--reference" in runner.invoke(app, ["eval-ppl", "--help"]).stdout


@pytest.mark.skipif(not mauve_available(), reason="mauve-text is not installed")
def test_each_file_gets_a_mauve_value_in_the_json_and_the_table(judge_folder, files, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = _run(judge_folder, *files, "reference.txt", "--reference", "reference.txt")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    values = {name: body["mauve"] for name, body in report["files"].items()}
    assert values["reference.txt"] == pytest.approx(1.0, abs=1e-9)  # the reference against itself
    assert values["repeated.txt"] < 0.5 < values["samples.jsonl"]
    assert report["mauve"]["reference"] == "reference.txt" and report["mauve"]["skipped"] is None
    detail = report["mauve"]["results"]["samples.jsonl"]
    assert (detail["num_p"], detail["num_q"], detail["num_buckets"]) == (24, 30, 2)
    assert detail["max_tokens"] == 64  # 1024 for plain text, capped at the tiny judge's 64 positions
    lines = result.stderr.splitlines()
    header = next(line for line in lines if line.strip().startswith("file"))
    assert "file #1: samples.jsonl" in lines  # too long beside seven numbers at 80 columns: numbered, named below
    row = next(line for line in lines if line.strip().startswith("#1 "))
    assert header.rstrip().endswith("MAUVE") and row.rstrip().endswith(f"{values['samples.jsonl']:.3f}")
    assert max(len(line.rstrip()) for line in lines if not line.startswith("note:")) <= 80  # a note is one line
    assert [line for line in lines if line.startswith("note:")] == [f"note: {few_texts_note(24, 30)}"]


@pytest.mark.skipif(not mauve_available(), reason="mauve-text is not installed")
def test_mauve_from_few_samples_gets_the_sweeps_note_and_enough_get_none(judge_folder, files):
    few = _run(judge_folder, "samples.jsonl", "--reference", "reference.txt")
    assert few.exit_code == 0, few.stderr
    note = "note: MAUVE from 24 samples per file is coarse (k-means on so few texts has 2 buckets"
    assert few.stderr.count(note) == 1  # the sweep's words (evaluation.mauve.few_texts_note)
    with open("more.txt", "w") as handle:
        handle.write("".join(f"sample number {i} of the cat and the dog.\n" for i in range(25)))
    enough = _run(judge_folder, "more.txt", "--reference", "reference.txt")
    assert enough.exit_code == 0, enough.stderr
    assert "note:" not in enough.stderr
    assert few_texts_note(25, 30) is None and few_texts_note(30, 24).startswith("MAUVE against 24 reference texts")


def test_without_mauve_text_one_note_line_and_the_other_numbers_unchanged(judge_folder, files, monkeypatch):
    plain = _run(judge_folder, *files, "-q")
    monkeypatch.setitem(sys.modules, "mauve", None)  # `import mauve` fails as when it is not installed
    skipped = _run(judge_folder, *files, "--reference", "reference.txt", "-q")
    assert skipped.exit_code == 0, skipped.stderr
    assert skipped.stderr.strip().splitlines() == [NOTE]
    report, before = json.loads(skipped.stdout), json.loads(plain.stdout)
    assert report["mauve"]["skipped"] == NOTE.removeprefix("note: ")
    for name, body in report["files"].items():
        assert body.pop("mauve") is None
        assert body == before["files"][name]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--reference: input file missing.txt does not exist"),
        ("", "--reference: missing.txt holds no samples"),
        ("only one line\n", "MAUVE needs at least 2 texts per file; missing.txt has 1"),
    ],
)
def test_a_bad_reference_is_one_line_error_before_the_judge_loads(files, content, message):
    if content is not None:
        with open("missing.txt", "w") as handle:
            handle.write(content)
    # A judge that cannot load: the reference's error must come first.
    result = runner.invoke(app, ["eval-ppl", *files, "--reference", "missing.txt", "--judge", "did-tests/no-judge"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_a_malformed_jsonl_reference_names_its_line(files):
    with open("reference.jsonl", "w") as handle:
        handle.write('{"text": "fine"}\n{"text": "trunc\n')
    result = runner.invoke(app, ["eval-ppl", *files, "--reference", "reference.jsonl", "--judge", "did-tests/no"])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --reference: reference.jsonl line 2: not valid JSON")
    assert line.endswith("truncated?)")


@pytest.mark.skipif(not mauve_available(), reason="mauve-text is not installed")
def test_a_files_mauve_does_not_depend_on_the_other_files_given(judge_folder, files, tiny_checkpoint, tmp_path):
    for name, length in (("short.jsonl", "16"), ("long.jsonl", "32")):
        args = ["draft", "--model", tiny_checkpoint, "-n", "3", "--length", length, "--seed", "1", "-q"]
        assert runner.invoke(app, [*args, "--out", str(tmp_path / name)]).exit_code == 0
    alone = json.loads(_run(judge_folder, "short.jsonl", "--reference", "reference.txt").stdout)
    together = json.loads(_run(judge_folder, "short.jsonl", "long.jsonl", "--reference", "reference.txt").stdout)
    assert together["files"]["short.jsonl"]["mauve"] == alone["files"]["short.jsonl"]["mauve"]
    cuts = {name: body["max_tokens"] for name, body in together["mauve"]["results"].items()}
    assert cuts == {"short.jsonl": 16, "long.jsonl": 32}

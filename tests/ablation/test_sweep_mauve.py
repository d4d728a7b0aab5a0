"""`did sweep --reference`: MAUVE of every scored file against reference texts, added to rows without resampling."""

import json
import sys

import pytest

from did_cli.ablation import run_sweep
from did_cli.ablation.results import read_results
from did_cli.errors import InputError
from did_cli.evaluation import load_judge
from did_cli.evaluation.mauve import MauveSettings, mauve_available, mauve_score
from did_cli.records import read_records
from tests.ablation.test_sweep import tiny_settings

needs_mauve = pytest.mark.skipif(not mauve_available(), reason="mauve-text is not installed")


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "reference.jsonl"
    lines = [f"the {w} of the {v} was {u} and" for w, v, u in zip("abcdefgh", "ijklmnop", "qrstuvwx", strict=True)]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return path


@needs_mauve
def test_mauve_is_added_to_finished_rows_without_sampling_or_scoring_again(
    tiny_checkpoint, judge_folder, reference, tmp_path
):
    out = tmp_path / "out"
    settings = tiny_settings(tiny_checkpoint, judge_folder, out, num_samples=4, batch_size=4, remask=["snapshot"])
    run_sweep(settings)
    assert all("mauve" not in row for row in read_results(out / "results.jsonl"))
    with_reference = tiny_settings(
        tiny_checkpoint, judge_folder, out, num_samples=4, batch_size=4, remask=["snapshot"], reference=reference
    )
    result = run_sweep(with_reference)
    assert (result.drafted, result.refined, result.scored, result.reused) == (0, 0, 0, 2)
    rows = {row["variant"]: row for row in result.rows}
    # The value equals MAUVE computed here, directly, from the sample file and the reference.
    judge = load_judge(judge_folder)
    texts = [json.loads(line)["text"] for line in reference.read_text().splitlines()]
    for variant, row in rows.items():
        samples = [r.text for r in read_records(out / row["file"])]
        expected = mauve_score(samples, texts, judge, MauveSettings(max_tokens=32, batch_size=8))
        assert row["mauve"]["mauve"] == pytest.approx(expected.mauve), variant
        assert row["mauve"]["reference"] == str(reference) and len(row["mauve"]["reference_sha256"]) == 64
    text = (out / "report.md").read_text()
    assert "**MAUVE**" in text and "| MAUVE |" in text
    again = run_sweep(with_reference)
    assert again.rows == result.rows  # already there: nothing recomputed, no row appended
    assert len(read_results(out / "results.jsonl")) == 4  # two scored rows, then the two with MAUVE


def test_without_mauve_text_the_sweep_notes_it_once_and_carries_on(
    tiny_checkpoint, judge_folder, reference, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "mauve", None)  # `import mauve` fails as when it is not installed
    events = []
    settings = tiny_settings(
        tiny_checkpoint, judge_folder, tmp_path / "out", num_samples=2, batch_size=2, remask=["snapshot"]
    )
    settings = type(settings)(**{**settings.__dict__, "reference": reference})
    result = run_sweep(settings, events.append)
    notes = [e.message for e in events if e.kind == "note"]
    assert notes == ["MAUVE skipped: mauve-text is not installed (pip install 'did[mauve]')"]
    assert len(result.rows) == 2 and all("mauve" not in row for row in result.rows)


@pytest.mark.parametrize("content", ["", '{"text": "only one"}\n', "{broken\n"])
def test_a_bad_reference_fails_before_any_model_loads(content, tmp_path):
    path = tmp_path / "reference.jsonl"
    path.write_text(content)
    settings = tiny_settings("no-such-model", "no-such-judge", tmp_path / "out", reference=path)
    with pytest.raises(InputError, match="^--reference"):  # the message says which file was the reference
        run_sweep(settings)
    assert not (tmp_path / "out").exists()


@needs_mauve
def test_a_fresh_sweep_with_a_reference_writes_each_row_once(tiny_checkpoint, judge_folder, reference, tmp_path):
    out = tmp_path / "out"
    settings = tiny_settings(
        tiny_checkpoint, judge_folder, out, num_samples=3, batch_size=3, remask=["snapshot"], reference=reference
    )
    events = []
    run_sweep(settings, events.append)
    rows = read_results(out / "results.jsonl")
    assert [row["variant"] for row in rows] == ["draft", "snapshot-g0.5-b32"]
    assert all(isinstance(row["mauve"]["mauve"], float) for row in rows)
    assert any(e.kind == "note" and "MAUVE from 3 samples per file is coarse" in e.message for e in events)


def test_mauve_with_a_single_sample_is_refused_before_anything_runs(reference):
    from did_cli.ablation import SweepSettings
    from did_cli.errors import UsageError

    with pytest.raises(UsageError, match="needs --num-samples of at least 2"):
        SweepSettings(models=["did-tiny"], num_samples=1, reference=reference)


@pytest.mark.parametrize(("name", "message"), [("missing.jsonl", "does not exist"), (".", "is not a file")])
def test_a_reference_that_is_not_a_file_is_named_as_such(name, message, tmp_path):
    settings = tiny_settings("no-such-model", "no-such-judge", tmp_path / "out", reference=tmp_path / name)
    with pytest.raises(InputError, match=message):
        run_sweep(settings)

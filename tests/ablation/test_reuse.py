"""The sweep reuses a sample file exactly when `--resume` would keep it, and scores files as `did eval-ppl` does."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from did_cli.ablation import run_sweep
from did_cli.ablation.results import read_results
from did_cli.cli import app
from tests.ablation.test_sweep import tiny_settings

runner = CliRunner()


def _stage(**changes):
    def change(record):
        record["stages"][0].update(changes)
        return record

    return change


def _without(key):
    def change(record):
        del record["stages"][0][key]
        return record

    return change


def _set(**changes):
    return lambda record: {**record, **changes}


# (case, how every record of a finished draft file is changed, whether it was made as the run makes it)
CASES = [
    ("untouched", lambda record: record, True),
    ("written before entropy_window was recorded", _without("entropy_window"), True),
    ("another top-p", _stage(top_p=0.5), False),
    ("another draft block size", _stage(block_size=8), False),
    ("another seed", _set(seed=1), False),
    ("other weights", _stage(model={"name": "x", "sha256": "0" * 64}), False),
    ("another prompt", _set(prompt="x"), False),
    ("another vocabulary", _set(tokenizer={"name": "gpt2", "vocab_size": 50257}), False),
    ("bfloat16 numerics", _stage(dtype="bfloat16", kv_cache_dtype="bfloat16"), False),
]


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, judge_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse") / "sweep"
    run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out, remask=["snapshot"]))
    return out


@pytest.mark.parametrize(("case", "change", "made_with"), CASES, ids=[case for case, _, _ in CASES])
def test_the_sweep_reuses_a_file_exactly_when_resume_keeps_it(
    tiny_checkpoint, judge_folder, finished, tmp_path, case, change, made_with
):
    out = tmp_path / "sweep"
    shutil.copytree(finished, out)
    (out / "results.jsonl").unlink()  # so the sweep must read its sample files again
    draft = next(out.rglob("draft.jsonl"))
    records = [change(json.loads(line)) for line in draft.read_text().splitlines()]
    draft.write_text("".join(json.dumps(record) + "\n" for record in records))

    resume = tmp_path / "out.jsonl"
    shutil.copy(draft, resume)
    args = ["draft", "-m", str(tiny_checkpoint), "-n", "3", "--batch-size", "3", "-q", "--out", str(resume)]
    resumed = runner.invoke(app, [*args, "--resume"])
    swept = run_sweep(tiny_settings(tiny_checkpoint, judge_folder, out, remask=["snapshot"]))

    assert (resumed.exit_code == 0) is made_with, resumed.stderr
    assert (swept.drafted == 0) is made_with
    # The refined file was made from the drafts as they were: any change to them makes it another input's refinement.
    assert (swept.refined == 0) is (case == "untouched")


def test_the_sweep_scores_a_file_as_eval_ppl_does(tmp_path):
    """The same file, the same judge: the same gen PPL, entropy and per-sample values, bit for bit.

    did-tiny at its full length (128) with did-tiny-judge: the judge re-tokenises some samples into more tokens
    than they were sampled at, so the records' sampling-length cut decides the numbers (the sweep once scored
    without it and reported another gen PPL than eval-ppl for its own draft.jsonl).
    """
    settings = dict(num_samples=12, remask=["snapshot"], refine_block_sizes=[128], batch_size=12)
    result = run_sweep(tiny_settings("did-tiny", "did-tiny-judge", tmp_path / "sweep", **settings))
    for row in read_results(tmp_path / "sweep" / "results.jsonl"):
        file = tmp_path / "sweep" / row["file"]
        per_sample = tmp_path / f"{row['variant']}.jsonl"
        args = ["eval-ppl", str(file), "--judge", "did-tiny-judge", "-q", "--json", str(tmp_path / "ppl.json")]
        done = runner.invoke(app, [*args, "--per-sample", str(per_sample)])
        assert done.exit_code == 0, done.stderr
        summary = json.loads((tmp_path / "ppl.json").read_text())["files"][str(file)]
        for key in ("gen_ppl", "gen_ppl_pooled", "entropy", "num_degenerate", "mean_tokens"):
            assert row[key] == summary[key], key
        samples = [json.loads(line) for line in per_sample.read_text().splitlines()]
        assert row["per_sample"]["ppl"] == [s["ppl"] for s in samples]
        if row["variant"] == "draft":
            assert any(s["truncated"] for s in samples)  # the cut is exercised, so the equality means something
    assert result.scored == 2

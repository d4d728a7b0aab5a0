"""Model cards from a run's files and did's evaluation outputs, and the push to the Hub (tested at huggingface_hub's
upload API, which is replaced: the Hub cannot be reached here)."""

import json
import math
import random

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from typer.testing import CliRunner

from did_cli import hub
from did_cli.checkpoints import save_model
from did_cli.cli import app
from did_cli.errors import HubError, InputError, UsageError
from did_cli.model_card import MARKER
from did_cli.training.loop import finetune
from tests.conftest import make_tiny_model
from tests.training.conftest import WORDS, make_settings

runner = CliRunner()


def _corpus(folder):
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))).capitalize() + "." for _ in range(300)]
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    return folder


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_checkpoint):
    """A finished 10-step run (validated at its end), its eval-nll and eval-ppl outputs, another model's samples."""
    tmp = tmp_path_factory.mktemp("hub")
    corpus = _corpus(tmp / "corpus")
    finetune(make_settings(tmp, tiny_checkpoint, corpus, steps=10, val_every=5))
    final = tmp / "run" / "final"
    text = corpus / "train.txt"
    models = ["-m", final, "-m", tiny_checkpoint]
    _invoke("eval-nll", *models, "--data", text, "--block-size", "4,32", "--json", tmp / "nll.json")
    _invoke("generate", "-m", final, "-n", 2, "--length", 32, "--stages", "4,32", "--out", tmp / "refined.jsonl", "-q")
    _invoke("draft", "-m", tiny_checkpoint, "-n", 2, "--length", 32, "--out", tmp / "other.jsonl", "-q")
    files = [tmp / "refined.jsonl", tmp / "other.jsonl", text]
    _invoke("eval-ppl", *files, "--judge", "did-tiny-judge", "--json", tmp / "ppl.json")
    return tmp


def test_a_runs_card_parses_and_its_numbers_are_the_runs_files(run):
    final = run / "run" / "final"
    text = (final / "README.md").read_text()
    summary = json.loads((run / "run" / "summary.json").read_text())
    settings = json.loads((run / "run" / "settings.json").read_text())
    meta = _front_matter(text)
    assert meta == ModelCard(text).data.to_dict()  # huggingface_hub reads the same metadata
    assert meta["library_name"] == "transformers" and {"diffusion", "block-diffusion", "bd3lm"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # a fresh model on local files
    assert MARKER in text
    assert summary["validation_nelbo"]  # the run validated at its end
    for size, value in summary["validation_nelbo"].items():
        assert f"| {size} | {value:.4f} | {math.exp(value):.2f} |" in text
    s = settings["settings"]
    assert f"| tokens seen | {summary['steps'] * s['batch_size'] * s['seq_len']:,} |" in text
    assert f"| optimizer steps | {summary['steps']:,} |" in text
    assert f"| block-size mix | `{s['mix']}` |" in text
    assert settings["data"]["fingerprint"] in text and f"did {settings['versions']['did']}" in text
    assert str(run) not in text  # absolute local paths appear by their last part only
    for claim in ("eval-nll", "Generative perplexity"):
        assert claim not in text  # never an evaluation that was not run


def test_a_card_without_a_run_or_a_validation_claims_no_evaluation(tmp_path, tiny_checkpoint):
    folder = save_model(make_tiny_model(), tmp_path / "saved")
    assert "## Evaluation" not in (folder / "README.md").read_text()
    out = make_settings(tmp_path, tiny_checkpoint, _corpus(tmp_path / "corpus"), steps=2, warmup=1, val_batches=0)
    card = (finetune(out).final / "README.md").read_text()
    assert "## Training" in card and "## Evaluation" not in card and "NELBO" not in card


def test_evaluations_in_the_card_are_this_models_rows_of_the_eval_outputs(run):
    final = run / "run" / "final"
    card = hub.write_card(final, repo_id="me/tiny", eval_nll=[run / "nll.json"], eval_ppl=[run / "ppl.json"])
    text = (final / "README.md").read_text()
    assert text == card.text and "# me/tiny" in text and "did draft --model me/tiny" in text
    nll = json.loads((run / "nll.json").read_text())
    ours = [r for r in nll["results"] if nll["models"][r["model"]]["path"] == str(final)]
    assert len(ours) == 2 and len(nll["results"]) == 4
    for row in ours:
        assert f"| {row['block_size']} | {row['nelbo']:.4f} | {row['stderr']:.4f} | {row['ppl_bound']:.2f} |" in text
    section = text[text.index("### Likelihood bound") : text.index("### Generative")]
    assert section.count("\n| 4 |") == 1 and section.count("\n| 32 |") == 1  # the other model's rows are left out
    ppl = json.loads((run / "ppl.json").read_text())
    refined = next(v for k, v in ppl["files"].items() if k.endswith("refined.jsonl"))
    row = f"| `refined.jsonl` | draft B=4, top-p 0.9 → refine snapshot γ=0.5 B=32 | {refined['gen_ppl']:.2f} | "
    assert row + f"{refined['entropy']:.3f} | 2 | {refined['num_degenerate']} | `did-tiny-judge` |" in text
    assert "other.jsonl" not in text and "train.txt" not in text.split("### Generative")[1]
    assert any("other.jsonl (sampled with other weights)" in s for s in card.skipped)
    assert any("train.txt (not did sample records)" in s for s in card.skipped)


def test_an_evaluation_of_other_weights_is_refused(run, tmp_path):
    folder = save_model(make_tiny_model(seed=9), tmp_path / "other")
    with pytest.raises(InputError, match="has no results for the weights"):
        hub.build_card(folder, eval_nll=[run / "nll.json"])
    with pytest.raises(InputError, match="scores no samples made with the weights"):
        hub.build_card(folder, eval_ppl=[run / "ppl.json"])


def test_base_model_and_dataset_metadata_come_from_the_runs_settings(run, tmp_path):
    folder = tmp_path / "run" / "final"
    folder.parent.mkdir()
    save_model(make_tiny_model(), folder)
    record = json.loads((run / "run" / "settings.json").read_text())
    record["settings"] |= {"init": None, "model": "kuleshov-group/bd3lm-owt-block_size1024-pretrain"}
    record["settings"] |= {"data": "Skylion007/openwebtext", "seq_len": None}
    record["data"]["hub"] = True
    record["overrides"] = [{"step": 4, "setting": "batch_size", "from": 4, "to": 8}]
    (folder.parent / "settings.json").write_text(json.dumps(record))
    (folder.parent / "summary.json").write_text(json.dumps({"steps": 10, "validation_nelbo": {}}))
    text = hub.build_card(folder, license_id="apache-2.0").text
    meta = _front_matter(text)
    assert meta["base_model"] == "kuleshov-group/bd3lm-owt-block_size1024-pretrain"
    assert meta["datasets"] == ["Skylion007/openwebtext"] and meta["license"] == "apache-2.0"
    assert f"| tokens seen | {(4 * 4 + 6 * 8) * 32:,} |" in text  # 4 steps of 4 rows, then 6 of 8; L = 32
    assert "`batch_size` 4 → 8 at step 4" in text


@pytest.fixture
def hub_calls(monkeypatch):
    """huggingface_hub's API with the network replaced: records every call; a token and a reachable Hub."""
    calls = []

    def record(name, result=None):
        def call(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return result

        return call

    class Commit:
        commit_url = "https://huggingface.co/me/tiny/commit/abc"

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(HfApi, "create_repo", record("create_repo"))
    monkeypatch.setattr(HfApi, "create_branch", record("create_branch"))
    monkeypatch.setattr(HfApi, "upload_folder", record("upload_folder", Commit()))
    return calls


def test_push_uploads_the_folder_to_the_repository_in_one_call(tmp_path, hub_calls):
    folder = save_model(make_tiny_model(), tmp_path / "final")
    result = hub.push_folder(folder, "me/tiny", revision="v1")
    names = [name for name, _, _ in hub_calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    upload = hub_calls[-1][2]
    assert upload["repo_id"] == "me/tiny" and upload["folder_path"] == str(folder) and upload["revision"] == "v1"
    assert hub_calls[0][1] == ("me/tiny",) and hub_calls[0][2]["private"] is False
    assert hub_calls[1][2]["branch"] == "v1"
    assert "did draft --model me/tiny" in (folder / "README.md").read_text()  # the card names the repository
    assert result.files == ("README.md", "config.json", "model.safetensors")
    assert "me/tiny@v1" in result.describe() and result.commit_url.endswith("/commit/abc")


def test_push_refuses_to_publish_to_an_existing_public_repository_when_asked_for_a_private_one(
    tmp_path, hub_calls, monkeypatch
):
    class Info:
        private = False

    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id: Info())
    folder = save_model(make_tiny_model(), tmp_path / "final")
    with pytest.raises(HubError, match="exists and is public.*nothing was uploaded"):
        hub.push_folder(folder, "me/tiny", private=True)
    assert "upload_folder" not in [name for name, _, _ in hub_calls]


def test_a_failed_upload_says_the_repository_holds_none_of_the_folder(tmp_path, hub_calls, monkeypatch):
    def fail(self, **kwargs):
        raise ConnectionError("connection reset by peer\ntraceback noise")

    monkeypatch.setattr(HfApi, "upload_folder", fail)
    folder = save_model(make_tiny_model(), tmp_path / "final")
    with pytest.raises(HubError) as info:
        hub.push_folder(folder, "me/tiny")
    message = str(info.value)
    assert "\n" not in message and "connection reset by peer" in message and "holds none of it" in message


def test_a_users_own_readme_is_kept(tmp_path, hub_calls):
    folder = save_model(make_tiny_model(), tmp_path / "final")
    (folder / "README.md").write_text("# my card\n")
    hub.push_folder(folder, "me/tiny")
    assert (folder / "README.md").read_text() == "# my card\n"
    with pytest.raises(UsageError, match="not written by did"):
        hub.push_folder(folder, "me/tiny", license_id="mit")


def test_finetune_push_to_hub_checks_before_training_and_uploads_final_after(tmp_path, tiny_checkpoint, hub_calls):
    corpus = _corpus(tmp_path / "corpus")
    base = ["finetune", "--init", "tiny", "--hidden-dim", "32", "--n-blocks", "2", "--n-heads", "2", "--cond-dim", "16"]
    base += ["--tokenizer", tiny_checkpoint, "--data", corpus, "--seq-len", 32, "--steps", 2, "--batch-size", 4]
    base += ["--val-every", 0, "--val-batches", 0, "--cache-dir", tmp_path / "cache", "-q"]
    result = runner.invoke(app, [str(a) for a in [*base, "--out", tmp_path / "bad", "--push-to-hub", "not a repo"]])
    assert result.exit_code == 2 and not (tmp_path / "bad").exists(), result.stderr
    result = runner.invoke(app, [str(a) for a in [*base, "--out", tmp_path / "run", "--push-to-hub", "me/tiny"]])
    assert result.exit_code == 0, result.stderr
    upload = hub_calls[-1][2]
    assert upload["folder_path"] == str(tmp_path / "run" / "final") and upload["repo_id"] == "me/tiny"
    assert "pushed" in result.stderr and "me/tiny@main" in result.stderr

"""`did push`: a thin layer over `did_cli.hub.push_folder`; without a token or a Hub, one line and nothing written."""

import huggingface_hub
import pytest
from huggingface_hub import HfApi
from typer.testing import CliRunner

from did_cli import hub
from did_cli.checkpoints import save_model
from did_cli.cli import app
from tests.conftest import make_tiny_model

runner = CliRunner()


def _state(folder):
    """Every path under `folder`, with the bytes and modification time of each file."""
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def folder(tmp_path, char_tokenizer):
    saved = save_model(make_tiny_model(), tmp_path / "final", char_tokenizer)
    (saved / "README.md").unlink()  # a folder whose card a push would have to write
    return saved


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def _one_line_failure(result):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def test_push_without_a_token_is_one_line_and_writes_nothing(folder, no_token, monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)  # a reachable Hub: only the token is missing
    before = _state(folder.parent)
    line = _one_line_failure(runner.invoke(app, ["push", str(folder), "me/tiny"]))
    assert "no Hugging Face token" in line and "hf auth login" in line
    assert _state(folder.parent) == before


def test_push_offline_is_one_line_and_writes_nothing(folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # conftest sets HF_HUB_OFFLINE=1
    before = _state(folder.parent)
    line = _one_line_failure(runner.invoke(app, ["push", str(folder), "me/tiny"]))
    assert "cannot push to the Hugging Face Hub: HF_HUB_OFFLINE is set" in line
    assert _state(folder.parent) == before


def test_push_hands_the_folder_and_repository_to_huggingface_hubs_upload(folder, monkeypatch):
    uploads = []
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kwargs: uploads.append(kwargs))
    result = runner.invoke(app, ["push", str(folder), "me/tiny", "--message", "first"])
    assert result.exit_code == 0, result.stderr
    assert [(u["folder_path"], u["repo_id"], u["revision"], u["commit_message"]) for u in uploads] == [
        (str(folder), "me/tiny", None, "first")
    ]
    assert result.stdout == "" and "pushed" in result.stderr and "(5 files)" in result.stderr
    assert "# me/tiny" in (folder / "README.md").read_text()


def test_push_dry_run_writes_the_card_and_contacts_no_hub(folder, no_token):
    result = runner.invoke(app, ["push", str(folder), "me/tiny", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "would push to me/tiny: README.md, config.json, model.safetensors" in result.stderr
    assert (folder / "README.md").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["push", "{folder}", "not a repo"], "is not a Hugging Face repository id"),
        (["push", "{missing}", "me/tiny"], "is not a folder"),
        (["push", "{folder}", "me/tiny", "--eval-nll", "{missing}"], "cannot read"),
    ],
)
def test_push_refuses_bad_input_in_one_line(folder, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    paths = {"folder": str(folder), "missing": str(tmp_path / "missing")}
    line = _one_line_failure(runner.invoke(app, [a.format(**paths) for a in args]))
    assert message in line


def test_push_help():
    result = runner.invoke(app, ["push", "--help"])
    assert result.exit_code == 0 and "--eval-nll" in result.stdout and "--dry-run" in result.stdout

"""Which tokenizer a checkpoint gets: recorded at save, resolved inside the model folder, offline fast, size-checked."""

import json
import shutil
import socket
import time

import pytest
from tokenizers import Tokenizer, models

from did_cli import checkpoints
from did_cli.checkpoints import (
    load_model,
    load_tokenizer,
    save_model,
    tokenizer_source,
    tokenizer_vocab_size,
)
from did_cli.errors import ModelLoadError
from tests.conftest import EOT, make_tiny_model


def _tokenizer_of_size(size):
    """A word-level tokenizer with `size` ids (the last is the EOS token), built without did."""
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size - 1)} | {EOT: size - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOT))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT)


def _bare_copy(folder, target):
    """A checkpoint folder with only config.json and the weights (the tokenizer files left behind)."""
    target.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, target / name)
    return target


@pytest.fixture(scope="module")
def did_tiny():
    return load_model("did-tiny", device="cpu")


def test_embedded_tokenizer_is_named_by_its_embedded_name(did_tiny):
    source = tokenizer_source(load_tokenizer(did_tiny))
    assert (source.name, source.reference) == ("did-tiny", "did-tiny")
    assert source.path == str(checkpoints.EMBEDDED["did-tiny"].resolve())
    assert source.vocab_size == 4096


def test_fine_tune_of_did_tiny_records_its_tokenizer_and_loads_without_tokenizer_files(did_tiny, tmp_path, monkeypatch):
    save_model(did_tiny, tmp_path / "final", load_tokenizer(did_tiny))
    assert json.loads((tmp_path / "final" / "config.json").read_text())["tokenizer"] == "did-tiny"
    bare = _bare_copy(tmp_path / "final", tmp_path / "bare")
    monkeypatch.setattr(checkpoints, "_load_hub", lambda name: pytest.fail(f"asked the Hub for {name}"))
    tokenizer = load_tokenizer(load_model(str(bare)))
    assert tokenizer_source(tokenizer).name == "did-tiny" and len(tokenizer) == 4096


def test_a_save_of_a_saved_checkpoint_keeps_the_portable_reference(did_tiny, tmp_path):
    first = save_model(did_tiny, tmp_path / "a", load_tokenizer(did_tiny))
    again = load_model(str(first))
    tokenizer = load_tokenizer(again)
    assert tokenizer_source(tokenizer).path == str(first.resolve())
    save_model(again, tmp_path / "b", tokenizer)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["tokenizer"] == "did-tiny"


def test_checkpoint_naming_no_tokenizer_and_shipping_none_is_refused_offline(tmp_path, char_tokenizer, monkeypatch):
    folder = save_model(make_tiny_model(), tmp_path / "ckpt", char_tokenizer)
    assert json.loads((folder / "config.json").read_text())["tokenizer"] is None  # a local-only tokenizer
    bare = _bare_copy(folder, tmp_path / "bare")
    monkeypatch.setattr(checkpoints, "_load_hub", lambda name: pytest.fail(f"asked the Hub for {name}"))
    with pytest.raises(ModelLoadError, match="ships no tokenizer files.*--tokenizer") as info:
        load_tokenizer(load_model(str(bare)))
    assert "\n" not in str(info.value)


def _bare_gpt2_sized_checkpoint(tmp_path, tokenizer=None):
    folder = save_model(make_tiny_model(vocab_size=50258), tmp_path / "g")
    if tokenizer is not None:
        body = json.loads((folder / "config.json").read_text()) | {"tokenizer": tokenizer}
        (folder / "config.json").write_text(json.dumps(body))
    return load_model(str(folder))


def test_offline_hub_tokenizer_fails_in_seconds_naming_the_flag(tmp_path):
    model = _bare_gpt2_sized_checkpoint(tmp_path, tokenizer="some-org/not-cached-tokenizer")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE.*--tokenizer") as info:
        load_tokenizer(model)
    assert time.perf_counter() - started < 5 and "\n" not in str(info.value)


def test_unreachable_hub_fails_in_seconds_naming_the_flag(tmp_path, monkeypatch):
    from huggingface_hub import constants

    model = _bare_gpt2_sized_checkpoint(tmp_path)  # no tokenizer named: BD3-LM's GPT-2 convention applies
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def no_route(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'gpt2' is not in the local Hugging Face cache.*cannot be reached"):
        load_tokenizer(model)
    assert time.perf_counter() - started < 5


def test_config_tokenizer_folder_resolves_against_the_model_folder(tmp_path, char_tokenizer, monkeypatch):
    folder = save_model(make_tiny_model(), tmp_path / "m")
    char_tokenizer.save_pretrained(str(folder / "tok"))
    body = json.loads((folder / "config.json").read_text()) | {"tokenizer": "tok"}
    (folder / "config.json").write_text(json.dumps(body))
    elsewhere = tmp_path / "cwd"
    _tokenizer_of_size(40).save_pretrained(str(elsewhere / "tok"))  # a decoy with the same relative name
    monkeypatch.chdir(elsewhere)
    tokenizer = load_tokenizer(load_model(str(folder)))
    assert len(tokenizer) == 68 and tokenizer_source(tokenizer).path == str((folder / "tok").resolve())


@pytest.mark.parametrize("reference", ["ABSOLUTE", "../outside", "tok/../../outside", "link"])
def test_config_tokenizer_outside_the_model_folder_is_refused(tmp_path, char_tokenizer, reference):
    outside = tmp_path / "outside"
    char_tokenizer.save_pretrained(str(outside))
    folder = save_model(make_tiny_model(), tmp_path / "m")
    (folder / "link").symlink_to(outside, target_is_directory=True)
    reference = str(outside) if reference == "ABSOLUTE" else reference
    body = json.loads((folder / "config.json").read_text()) | {"tokenizer": reference}
    (folder / "config.json").write_text(json.dumps(body))
    model = load_model(str(folder))
    with pytest.raises(ModelLoadError, match="outside the model folder; pass --tokenizer") as info:
        load_tokenizer(model)
    assert "\n" not in str(info.value)
    # The user may still point anywhere, explicitly.
    tokenizer = load_tokenizer(model, str(outside))
    assert tokenizer_source(tokenizer).name == str(outside.resolve()) and tokenizer_source(tokenizer).reference is None


def test_config_naming_its_own_folder_without_tokenizer_files_is_an_error_not_a_loop(tmp_path):
    folder = save_model(make_tiny_model(), tmp_path / "m")
    body = json.loads((folder / "config.json").read_text()) | {"tokenizer": "."}
    (folder / "config.json").write_text(json.dumps(body))
    with pytest.raises(ModelLoadError, match="holds no tokenizer.json"):
        load_tokenizer(load_model(str(folder)))


@pytest.mark.parametrize(
    "vocab_size,accepted",
    [
        (69, True),  # 68 ids + [MASK]
        (68 + 128, True),  # [MASK] plus padding to the next multiple of 64/128, at the limit
        (68 + 129, False),
        (1000, False),
    ],
)
def test_tokenizer_far_smaller_than_the_model_vocabulary_is_refused(char_tokenizer, vocab_size, accepted, tmp_path):
    folder = save_model(make_tiny_model(vocab_size=vocab_size), tmp_path / "m", char_tokenizer)
    model = load_model(str(folder))
    if accepted:
        assert tokenizer_vocab_size(load_tokenizer(model)) == 68
    else:
        with pytest.raises(ModelLoadError, match="68 tokens but the model's vocabulary is"):
            load_tokenizer(model)


def test_four_token_tokenizer_is_refused_for_a_thousand_row_model(tmp_path):
    _tokenizer_of_size(4).save_pretrained(str(tmp_path / "tok4"))
    model = make_tiny_model(vocab_size=1000)
    with pytest.raises(ModelLoadError, match="4 tokens but the model's vocabulary is 1000"):
        load_tokenizer(model, str(tmp_path / "tok4"))


def test_tokenizer_with_more_ids_than_the_embedding_is_refused(tmp_path):
    _tokenizer_of_size(80).save_pretrained(str(tmp_path / "tok80"))
    with pytest.raises(ModelLoadError, match="80 tokens but the model's vocabulary is 69"):
        load_tokenizer(make_tiny_model(), str(tmp_path / "tok80"))


def test_vocab_size_counts_added_tokens_past_the_base_vocabulary(char_tokenizer):
    tokenizer = _tokenizer_of_size(10)
    tokenizer.add_tokens(["<extra-a>", "<extra-b>"])
    assert tokenizer.convert_tokens_to_ids("<extra-b>") == 11
    assert tokenizer_vocab_size(tokenizer) == 12
    assert tokenizer_vocab_size(char_tokenizer) == 68

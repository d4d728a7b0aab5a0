import json
import os

import numpy as np
import pytest

from did_cli.data import DataSpec, PackedRows, tokenize_corpus
from did_cli.errors import DataError


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world\n\nsecond doc here\n" + "".join(f"line {i}\n" for i in range(50)))
    return folder


def test_documents_are_tokenised_with_eos_between_them(corpus_dir, char_tokenizer, tmp_path):
    corpus = tokenize_corpus(DataSpec(str(corpus_dir), val_fraction=0.1), char_tokenizer, tmp_path / "cache")
    eos = char_tokenizer.eos_token_id
    train = np.asarray(corpus.train)
    first = char_tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert train[: len(first) + 1].tolist() == [*first, eos]
    assert corpus.meta["documents"] == 52 and corpus.meta["valid_documents"] == 5
    assert int((np.asarray(corpus.valid) == eos).sum()) == 5


def test_cache_is_reused(corpus_dir, char_tokenizer, tmp_path):
    spec = DataSpec(str(corpus_dir))
    first = tokenize_corpus(spec, char_tokenizer, tmp_path / "cache")
    stamp = os.stat(first.folder / "train.bin").st_mtime_ns
    second = tokenize_corpus(spec, char_tokenizer, tmp_path / "cache")
    assert second.folder == first.folder and os.stat(second.folder / "train.bin").st_mtime_ns == stamp


def test_jsonl_text_field_and_file_documents(tmp_path, char_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(10)) + "\n")
    with pytest.raises(DataError, match="no column 'text'"):
        tokenize_corpus(DataSpec(str(path)), char_tokenizer, tmp_path / "c1")
    corpus = tokenize_corpus(DataSpec(str(path), text_field="body"), char_tokenizer, tmp_path / "c2")
    assert corpus.meta["documents"] == 10


def test_bad_paths_and_empty_corpora_are_data_errors(tmp_path, char_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        tokenize_corpus(DataSpec("./no/such/dir"), char_tokenizer, tmp_path / "c")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        tokenize_corpus(DataSpec(str(empty)), char_tokenizer, tmp_path / "c")
    (empty / "notes.md").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.md").write_text("x")
    with pytest.raises(DataError, match="no .txt"):
        tokenize_corpus(DataSpec(str(other)), char_tokenizer, tmp_path / "c")


def test_offline_hub_dataset_is_a_one_line_error(char_tokenizer, tmp_path):
    with pytest.raises(DataError, match="--data PATH") as info:
        tokenize_corpus(DataSpec("some-org/some-dataset-that-is-not-cached"), char_tokenizer, tmp_path / "c")
    assert "\n" not in str(info.value)


def test_packed_rows_cover_every_row_once_per_epoch_in_a_seeded_order():
    rows = PackedRows(np.arange(103, dtype=np.uint16), 10, seed=3)
    assert rows.num_rows == 10
    epoch = rows.batch(0, 10)
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 100, 10))
    assert rows.batch(3, 4).tolist() == epoch[3:7].tolist()
    again = PackedRows(np.arange(103, dtype=np.uint16), 10, seed=3)
    assert again.batch(8, 4).tolist() == rows.batch(8, 4).tolist()
    assert sorted(rows.batch(10, 10)[:, 0].tolist()) == list(range(0, 100, 10))


def test_replaced_corpus_of_same_size_and_mtime_is_retokenised(tmp_path, char_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("aaaa bbbb\ncccc dddd\n")
    stamp = os.stat(path).st_mtime_ns
    first = tokenize_corpus(DataSpec(str(path), val_fraction=0.0), char_tokenizer, tmp_path / "cache")
    path.write_text("zzzz yyyy\nxxxx wwww\n")  # same size
    os.utime(path, ns=(stamp, stamp))  # same mtime
    second = tokenize_corpus(DataSpec(str(path), val_fraction=0.0), char_tokenizer, tmp_path / "cache")
    expected = [
        t for line in ("zzzz yyyy", "xxxx wwww") for t in char_tokenizer(line, add_special_tokens=False)["input_ids"]
    ]
    eos = char_tokenizer.eos_token_id
    assert np.asarray(second.train)[np.asarray(second.train) != eos].tolist() == expected
    assert second.folder != first.folder and not (second.folder / "datasets").exists()


@pytest.mark.parametrize("source", ["nonexist.txt", "corpus.jsonl", "data/train.parquet", "a/b/c", "./x", "~/no-such"])
def test_missing_path_like_data_is_file_not_found_not_a_hub_error(tmp_path, char_tokenizer, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="file not found") as info:
        tokenize_corpus(DataSpec(source), char_tokenizer, tmp_path / "c")
    assert "\n" not in str(info.value) and "Hub" not in str(info.value) and "dataset" not in str(info.value)


def test_unreachable_hub_dataset_fails_in_seconds(tmp_path, char_tokenizer, monkeypatch):
    import socket
    import time

    import datasets
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def no_route(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_route)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"not cached and huggingface.co cannot be reached\); pass --data PATH"):
        tokenize_corpus(DataSpec("some-org/not-cached-dataset"), char_tokenizer, tmp_path / "c")
    assert time.perf_counter() - started < 10
    assert datasets.config.HF_HUB_OFFLINE is False  # restored after the call


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", b'garbage\n{"text": "x"}\n', "line 1: not valid JSON"),
        ("list.jsonl", b'{"text": "x"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), "is not UTF-8 text"),
        ("empty.txt", b"\n \n", "holds no text"),
    ],
)
def test_broken_local_files_are_one_line_data_errors(tmp_path, name, content, message):
    from did_cli.data import DataSpec, load_documents
    from did_cli.errors import DataError

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_documents(DataSpec(str(path)), cache_dir=tmp_path / "cache")

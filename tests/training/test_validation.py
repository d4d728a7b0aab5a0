"""Validation NELBO of `did finetune`: token-weighted over every held-out row, and the same number whatever the
micro-batch size (so whatever the number of processes) for the same weights."""

import json

import numpy as np
import pytest
import torch

from did_cli.checkpoints import load_model
from did_cli.data import DataSpec, PackedRows, tokenize_corpus
from did_cli.training.loop import Trainer, finetune
from did_cli.training.objective import nelbo_terms, noise_batch
from did_cli.training.setup import set_up, step_seed
from did_cli.training.validation import held_out_nelbo, validation_batches
from tests.conftest import build_char_tokenizer, make_tiny_model
from tests.training.conftest import make_settings


def _direct_nelbo(model, batches, block_size, seed):
    """sum of every NELBO term / every scored token, each batch noised whole from (seed, batch index)."""
    total, tokens = 0.0, 0
    for index, clean in enumerate(batches):
        generator = torch.Generator().manual_seed(step_seed(seed, index, "valid"))
        noisy, t = noise_batch(clean, block_size, model.mask_id, generator)
        with torch.no_grad():
            total += float(nelbo_terms(model, clean, noisy, t, min(block_size, clean.shape[1])).double().sum())
        tokens += clean.shape[0] * (clean.shape[1] - 1)
    return total / tokens


def _rows(count, length=32, seed=0):
    tokens = torch.randint(0, 68, (count * length,), generator=torch.Generator().manual_seed(seed)).numpy()
    return PackedRows(tokens.astype(np.int64), length, seed=0)


def test_validation_nelbo_is_token_weighted_across_uneven_batches():
    model = make_tiny_model(dropout=0.0)
    batches = validation_batches(_rows(10), count=5, batch_rows=4)
    assert [len(b) for b in batches] == [4, 4, 2]
    for size in (4, 32):
        ours = held_out_nelbo(model, batches, size, seed=3, chunk_rows=3)
        assert ours == pytest.approx(_direct_nelbo(model, batches, size, seed=3), rel=1e-6)
        # A mean of batch means would weigh the 2-row batch as much as a 4-row one.
        means = [held_out_nelbo(model, [b], size, seed=3) for b in batches]
        assert ours != pytest.approx(sum(means) / len(means), rel=1e-4)


def test_validation_rows_and_chunks_do_not_change_the_number():
    model = make_tiny_model(dropout=0.0)
    rows = _rows(20)
    batches = validation_batches(rows, count=2)  # 16 + 4 rows, whatever the chunk size
    assert [len(b) for b in batches] == [16, 4]
    assert torch.equal(torch.cat(batches), rows.sequential(0, 20))
    values = [held_out_nelbo(model, batches, 4, seed=0, chunk_rows=chunk) for chunk in (1, 3, 16, None)]
    assert values == pytest.approx([values[0]] * 4, rel=1e-6)


def _held_out_corpus(tmp_path, rows, length=32):
    """A training corpus and a validation file of exactly `rows` rows of `length` characters (one token each)."""
    (tmp_path / "train").mkdir()
    lines = [("the cat sat on the mat " * 4)[: length - 1].capitalize() for _ in range(200)]
    (tmp_path / "train" / "train.txt").write_text("\n".join(lines) + "\n")
    valid = [("a dog ran to the park " * 4)[i % 7 : i % 7 + length - 1] for i in range(rows)]
    (tmp_path / "valid.txt").write_text("\n".join(valid) + "\n")  # each line + EOS = one row
    return tmp_path / "train", tmp_path / "valid.txt"


def test_reported_validation_is_the_token_weighted_nelbo_of_every_held_out_row(tmp_path, tiny_checkpoint):
    corpus, valid = _held_out_corpus(tmp_path, rows=10)
    settings = make_settings(
        tmp_path, tiny_checkpoint, corpus, steps=2, warmup=1, valid_data=str(valid), val_batches=1, micro_batch_size=4
    )
    result = finetune(settings)
    tokens = tokenize_corpus(
        DataSpec(str(valid), val_fraction=0.0), build_char_tokenizer(), tmp_path / "cache", None
    ).train
    rows = PackedRows(tokens, 32, seed=0)
    assert rows.num_rows == 10
    model = load_model(str(result.final)).eval()  # the EMA weights validation used
    summary = json.loads((result.out / "summary.json").read_text())
    for size in (4, 32):
        expected = _direct_nelbo(model, [rows.sequential(0, 10)], size, settings.seed)
        assert summary["validation_nelbo"][str(size)] == pytest.approx(expected, rel=1e-5)


def _validation_at_step_0(tmp_path, tiny_checkpoint, corpus, **overrides):
    """Validation of a freshly set-up run (the seeded initial weights) and its clip-search events."""
    (tmp_path / "run").mkdir(parents=True)
    run = set_up(
        make_settings(tmp_path, tiny_checkpoint, corpus, val_fraction=0.2, val_batches=2, val_every=5, **overrides),
        None,
        False,
        False,
    )
    events = []
    run.emit = events.append
    results = Trainer(run).validate(0)
    return results, [e for e in events if e["event"] == "clip_search"]


def test_two_micro_batch_sizes_report_the_same_validation_for_the_same_weights(tmp_path, tiny_checkpoint, corpus):
    three, _ = _validation_at_step_0(tmp_path / "a", tiny_checkpoint, corpus, batch_size=6, micro_batch_size=3)
    eight, _ = _validation_at_step_0(tmp_path / "b", tiny_checkpoint, corpus, batch_size=8, micro_batch_size=8)
    assert three.keys() == eight.keys() == {4, 32}
    for size in three:
        assert three[size] == pytest.approx(eight[size], rel=1e-6)


def test_clip_search_does_not_depend_on_the_micro_batch_size(tmp_path, tiny_checkpoint, corpus):
    _, three = _validation_at_step_0(tmp_path / "a", tiny_checkpoint, corpus, micro_batch_size=2, clip="auto")
    _, eight = _validation_at_step_0(tmp_path / "b", tiny_checkpoint, corpus, micro_batch_size=8, clip="auto")
    assert [e["block_size"] for e in three] == [e["block_size"] for e in eight] == [4, 32]
    for a, b in zip(three, eight, strict=True):
        assert a["clip"] == b["clip"]
        assert list(a["variance"].values()) == pytest.approx(list(b["variance"].values()), rel=1e-5)


def test_no_validation_batches_trains_without_validation(tmp_path, tiny_checkpoint, corpus):
    result = finetune(make_settings(tmp_path, tiny_checkpoint, corpus, steps=4, warmup=2, val_every=2, val_batches=0))
    events = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert result.validation == {} and not [e for e in events if e["event"] == "validation"]

"""Fixtures for the training tests: a small text corpus, a word-level tokenizer with thousands of entries, and
FinetuneSettings for a tiny model that trains in a fraction of a second."""

from __future__ import annotations

import contextlib
import random
import signal

import pytest

from did_cli.settings import FinetuneSettings

WORDS = "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees".split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))).capitalize() + "." for _ in range(300)]
    (folder / "train.txt").write_text("\n".join(lines) + "\n")
    return folder


def make_settings(tmp_path, tiny_checkpoint, corpus, **overrides) -> FinetuneSettings:
    """A 20-step run of a 2-layer width-32 model on the character tokenizer, checkpoints every 10 steps."""
    base = dict(
        out=str(tmp_path / "run"),
        init="tiny",
        init_overrides=dict(hidden_dim=32, n_blocks=2, n_heads=2, cond_dim=16),
        tokenizer=str(tiny_checkpoint),
        data=str(corpus),
        mix="4:0.7,32:0.3",
        seq_len=32,
        steps=20,
        batch_size=8,
        micro_batch_size=4,
        lr=3e-3,
        warmup=5,
        save_every=10,
        val_every=0,
        val_batches=4,
        log_every=5,
        cache_dir=str(tmp_path / "cache"),
    )
    return FinetuneSettings(**(base | overrides))


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) when the block runs longer than `seconds`: a hang guard, not a speed test."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def word_data(tmp_path_factory):
    """(tokenizer folder, corpus folder): a 3,000-word vocabulary with Zipf-like use, so the embedding table has a
    realistic number of rows and a batch hits the same row many times."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(3200)})[:3000]
    eot = "<|endoftext|>"
    ids = {word: i for i, word in enumerate([eot, "[UNK]", *vocabulary])}
    backend = Tokenizer(models.WordLevel(vocab=ids, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot, bos_token=eot, unk_token="[UNK]")
    folder = tmp_path_factory.mktemp("words")
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
    lines = [" ".join(rng.choices(vocabulary, weights, k=rng.randint(20, 60))) for _ in range(400)]
    (folder / "corpus").mkdir()
    (folder / "corpus" / "train.txt").write_text("\n".join(lines) + "\n")
    return folder / "tokenizer", folder / "corpus"

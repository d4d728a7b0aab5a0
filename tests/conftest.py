"""Shared fixtures: a tiny random BD3-LM (2 layers, width 32) and offline Hugging Face settings."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import string  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from did_cli.config import ModelConfig  # noqa: E402
from did_cli.model import BD3LM  # noqa: E402

TINY = dict(vocab_size=69, model_length=32, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.1)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every weight a random value: the zero-initialised adaLN and output layer would hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(noise * (0.5 if param.ndim == 1 else param.shape[-1] ** -0.5))
    return model


def make_tiny_model(seed: int = 0, **overrides) -> BD3LM:
    config = ModelConfig(**{**TINY, **overrides})
    return randomize(BD3LM(config), seed).eval()


@pytest.fixture
def tiny_model() -> BD3LM:
    return make_tiny_model()


EOT = "<|endoftext|>"
CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,'\n"


def build_char_tokenizer():
    """A 68-token character tokenizer (67 characters + <|endoftext|>), so mask id 68 stays free."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab[EOT] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    backend.add_special_tokens([EOT])
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT)


@pytest.fixture(scope="session")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, char_tokenizer) -> Path:
    """A did checkpoint folder (random tiny model + character tokenizer) that load_model and the CLI accept."""
    from did_cli.checkpoints import save_model

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(make_tiny_model(dropout=0.0), folder, char_tokenizer)
    return folder

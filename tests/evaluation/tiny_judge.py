"""A tiny random GPT-2 judge saved like a Hub checkpoint, for the evaluation and CLI tests."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import build_char_tokenizer


def save_tiny_judge(folder: Path, n_positions: int = 64, seed: int = 0) -> Path:
    """2 layers, width 32, the 68-token character tokenizer (`<|endoftext|>` = 67 as BOS/EOS).

    The weights are drawn with a large spread (0.2, not GPT-2's 0.02) so that predictions depend visibly on the
    context; a near-uniform judge would let a wrong window pass the comparisons.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_char_tokenizer()
    eot = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=n_positions,
        initializer_range=0.2,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

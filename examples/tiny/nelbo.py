"""Validation NELBO (nats per token, true unclipped schedule) of models at several block sizes on one split.

`did finetune` reports validation NELBO only for the block sizes in its own mix; this scores any model at any block
size on the same held-out rows and noise, so the mix-scale and no-mix fine-tunes can be compared at B = L too.

    python examples/tiny/nelbo.py --model did-tiny --model runs/tiny-nomix/final --block-sizes 4,16,128
"""

from __future__ import annotations

import argparse

import torch

from did_cli.checkpoints import load_model, load_tokenizer
from did_cli.data import DataSpec, PackedRows, tokenize_corpus
from did_cli.training.objective import validation_nelbo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--data", default="data/tiny-corpus/valid.jsonl")
    parser.add_argument("--block-sizes", default="4,16,128")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4, help="noise draws per row (lower variance)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.block_sizes.split(",")]
    print("| model | " + " | ".join(f"NELBO B={s}" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in args.model:
        model = load_model(name, device="cpu")
        tokens = tokenize_corpus(DataSpec(args.data, val_fraction=0.0), load_tokenizer(model)).train
        rows = PackedRows(tokens, model.config.model_length, seed=0)
        cells = []
        for size in sizes:
            total, count = 0.0, 0
            for repeat in range(args.repeats):
                for first in range(0, rows.num_rows, args.batch_size):
                    clean = rows.sequential(first, args.batch_size)
                    generator = torch.Generator().manual_seed(1000 * repeat + first)
                    total += validation_nelbo(model, clean, size, generator) * clean.shape[0]
                    count += clean.shape[0]
            cells.append(f"{total / count:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

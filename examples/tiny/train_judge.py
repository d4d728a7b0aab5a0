"""Train `did-tiny-judge`: a small standard GPT-2 (transformers) on the tiny corpus, the judge for gen PPL.

Why a plain transformers GPT-2: `did eval-ppl` treats it exactly like `gpt2-large`, so the tiny numbers exercise
the real evaluation path. It uses the same tokenizer and the same tokenised, EOS-separated, wrapped rows as the
diffusion models (did's own data pipeline), and reports validation perplexity on the held-out split each
`--eval-every` steps. Deterministic for a given seed and thread count.

    python examples/tiny/train_judge.py --tokenizer data/tiny-tokenizer --data data/tiny-corpus/train.jsonl \
        --valid-data data/tiny-corpus/valid.jsonl --out runs/tiny-judge
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, get_constant_schedule_with_warmup

from did_cli.data import DataSpec, PackedRows, tokenize_corpus


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default="data/tiny-tokenizer")
    parser.add_argument("--data", default="data/tiny-corpus/train.jsonl")
    parser.add_argument("--valid-data", default="data/tiny-corpus/valid.jsonl")
    parser.add_argument("--out", default="runs/tiny-judge")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--positions", type=int, default=256, help="max positions (room for re-tokenised samples)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


@torch.no_grad()
def validation_ppl(model: GPT2LMHeadModel, rows: PackedRows, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for first in range(0, rows.num_rows, batch_size):
        batch = rows.sequential(first, batch_size)
        out = model(batch, labels=batch)
        tokens = batch[:, 1:].numel()
        total += float(out.loss) * tokens
        count += tokens
    model.train()
    return math.exp(total / count)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    train = tokenize_corpus(DataSpec(args.data, val_fraction=0.0), tokenizer).train
    valid = tokenize_corpus(DataSpec(args.valid_data, val_fraction=0.0), tokenizer).train
    train_rows, valid_rows = PackedRows(train, args.seq_len, args.seed), PackedRows(valid, args.seq_len, args.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.positions,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = get_constant_schedule_with_warmup(optimizer, args.warmup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as log:
        train_loop(model, optimizer, scheduler, train_rows, valid_rows, args, log)
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")


def train_loop(model, optimizer, scheduler, train_rows, valid_rows, args, log) -> None:  # noqa: ANN001
    tic = time.perf_counter()
    for step in range(args.steps):
        batch = train_rows.batch(step * args.batch_size, args.batch_size)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            ppl = validation_ppl(model, valid_rows, args.batch_size)
            event = {
                "step": done,
                "train_loss": float(loss.detach()),
                "valid_ppl": ppl,
                "seconds": time.perf_counter() - tic,
            }
            log.write(json.dumps(event) + "\n")
            log.flush()
            print(json.dumps(event), flush=True)


if __name__ == "__main__":
    main()

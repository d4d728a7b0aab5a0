"""Cut held-out documents into samples of real text as long as generated ones, for the gen PPL reference row.

Each sample is `--tokens` consecutive tokens (did-tiny's tokenizer) from the test split, decoded back to text, so
real text and generated samples are scored over the same length by the same judge.

    python examples/tiny/heldout_text.py --split data/tiny-corpus/test.jsonl --num 64 --out runs/measure/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from did_cli.checkpoints import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="data/tiny-corpus/test.jsonl")
    parser.add_argument("--tokenizer", default="did-tiny")
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=127, help="generated tokens per did-tiny sample (L - 1)")
    parser.add_argument("--out", default="runs/measure/heldout.jsonl")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    stream: list[int] = []
    with open(args.split, encoding="utf-8") as handle:
        for line in handle:
            stream += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            stream.append(tokenizer.eos_token_id)
    pieces = [stream[i : i + args.tokens] for i in range(0, len(stream) - args.tokens, args.tokens)][: args.num]
    if len(pieces) < args.num:
        raise SystemExit(f"only {len(pieces)} pieces of {args.tokens} tokens in {args.split}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as out:
        for piece in pieces:
            out.write(json.dumps({"text": tokenizer.decode(piece)}) + "\n")
    print(f"wrote {len(pieces)} samples of {args.tokens} tokens to {args.out}")


if __name__ == "__main__":
    main()

"""Train the tiny models' tokenizer: byte-level BPE on the corpus's train split, saved as a transformers folder.

Why byte-level BPE like GPT-2: every string encodes (no unknown token) and decodes back to itself, and the
pipeline treats it exactly like GPT-2's tokenizer. Why a small vocabulary (4096 by default): the embedding and
output layers dominate a model of a few million parameters. The only special token is `<|endoftext|>`, used as
BOS and EOS as in GPT-2; there is no [MASK] or pad token, because a BD3-LM model's [MASK] id is the first id past
the tokenizer (`len(tokenizer)`).

Training reads only train.jsonl, so valid/test statistics are honest. The result is deterministic: the same
train split and options give the same tokenizer.json (checked by the sha256 printed at the end).

    python examples/tiny/train_tokenizer.py --corpus data/tiny-corpus --out data/tiny-tokenizer
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EOT = "<|endoftext|>"


def read_texts(path: Path) -> Iterator[str]:
    """The `text` field of every line of a JSONL file, in file order."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)["text"]


def train(texts: Iterator[str], vocab_size: int, min_frequency: int) -> Any:
    """A GPT-2-style byte-level BPE `tokenizers.Tokenizer` with `<|endoftext|>` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap(tokenizer: Any) -> Any:
    """The `PreTrainedTokenizerFast` that `from_pretrained(folder)` rebuilds: BOS = EOS = UNK = `<|endoftext|>`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        clean_up_tokenization_spaces=False,
    )


def measure(tokenizer: Any, texts: list[str]) -> dict[str, float]:
    """Tokens, tokens per word and characters per token, and whether every text decodes back unchanged."""
    encodings = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    tokens = sum(len(ids) for ids in encodings)
    words = sum(len(text.split()) for text in texts)
    chars = sum(len(text) for text in texts)
    round_trip = all(tokenizer.decode(ids) == text for ids, text in zip(encodings, texts, strict=True))
    return {
        "documents": len(texts),
        "tokens": tokens,
        "tokens_per_word": tokens / max(1, words),
        "chars_per_token": chars / max(1, tokens),
        "round_trip": round_trip,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/tiny-corpus"), help="folder of train/valid.jsonl")
    parser.add_argument("--out", type=Path, default=Path("data/tiny-tokenizer"), help="output folder")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokens including <|endoftext|>")
    parser.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences for a merge")
    args = parser.parse_args(argv)

    train_path = args.corpus / "train.jsonl"
    if not train_path.exists():
        print(f"{train_path} not found; run examples/tiny/prepare_corpus.py first", file=sys.stderr)
        return 1
    started = time.perf_counter()
    fast = wrap(train(read_texts(train_path), args.vocab_size, args.min_frequency))
    trained = time.perf_counter() - started
    size = len(fast)
    if size != args.vocab_size:
        print(f"warning: the vocabulary has {size} tokens, not {args.vocab_size}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(args.out))
    # transformers 5 records its own class name (TokenizersBackend), which AutoTokenizer in transformers 4.x
    # (the project supports >= 4.45) does not know; the 4.x name loads in both.
    config_path = args.out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    from transformers import PreTrainedTokenizerFast

    loaded = PreTrainedTokenizerFast.from_pretrained(str(args.out))
    assert len(loaded) == size and loaded.bos_token == loaded.eos_token == EOT, "the saved folder does not reload"
    report: dict[str, object] = {"vocab_size": size, "eot_id": loaded.convert_tokens_to_ids(EOT)}
    for split in ("train", "valid", "test"):
        path = args.corpus / f"{split}.jsonl"
        if path.exists():
            report[split] = measure(loaded, list(read_texts(path)))
    digest = hashlib.sha256((args.out / "tokenizer.json").read_bytes()).hexdigest()
    report["tokenizer_json_sha256"] = digest
    print(json.dumps(report, indent=2))
    print(f"trained in {trained:.1f}s; wrote {args.out} in {time.perf_counter() - started:.1f}s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

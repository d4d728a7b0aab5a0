"""Copy the trained tiny models into the package as `did-tiny` and `did-tiny-judge` (bf16 weights, small files).

python examples/tiny/ship.py --model runs/tiny-mix/final --judge runs/tiny-judge/final
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from did_cli.checkpoints import EMBEDDED, load_model, load_tokenizer, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/tiny-mix/final")
    parser.add_argument("--judge", default="runs/tiny-judge/final")
    args = parser.parse_args()

    model = load_model(args.model, device="cpu")
    tokenizer = load_tokenizer(model)
    note = {"did_name": "did-tiny", "did_note": "demo model; see docs/tiny-models.md"}
    # The tokenizer ships in the folder, so the training-time tokenizer path is dropped; the clip interval the run
    # used is recorded where BD3-LM keeps it (runs exported before did recorded it themselves).
    run = json.loads((Path(args.model).parent / "settings.json").read_text())["settings"]
    eps_min, eps_max = run["clip"]
    model.config = dataclasses.replace(
        model.config,
        tokenizer=None,
        sampling_eps_min=eps_min,
        sampling_eps_max=eps_max,
        extra={**model.config.extra, **note},
    )
    model.sampling_eps_min.fill_(eps_min)
    model.sampling_eps_max.fill_(eps_max)
    save_model(model, EMBEDDED["did-tiny"], tokenizer, dtype=torch.bfloat16)

    judge_dir = EMBEDDED["did-tiny-judge"]
    if judge_dir.exists():
        shutil.rmtree(judge_dir)
    judge = AutoModelForCausalLM.from_pretrained(args.judge, dtype=torch.bfloat16)
    judge.save_pretrained(judge_dir)
    PreTrainedTokenizerFast.from_pretrained(args.judge).save_pretrained(judge_dir)
    for file in judge_dir.iterdir():
        file.chmod(0o644)  # package data: readable by every user of an installation
    for folder in (EMBEDDED["did-tiny"], judge_dir):
        size = sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**20
        print(f"{folder}: {size:.1f} MiB")


if __name__ == "__main__":
    main()

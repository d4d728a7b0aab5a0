#!/usr/bin/env bash
# The numbers of docs/ablations.md: the paper's ablations read at matched entropy, for three fine-tunes of the same
# tiny pretrain (examples/tiny/recipe.sh steps 3-4): mix-scale (400 steps), no-mix (400 steps) and no-mix at the
# paper's ~4x budget (1600 steps). Each model is drafted at top-p 0.5 ... 1.0 (the draft frontier) and its top-p 0.9
# draft refined by every strategy at gamma 0.5 and by snapshot over gamma, all with one global block (B2 = L = 128).
# MAUVE of every file against 160 held-out test-split passages of the same length (needs pip install 'did[mauve]').
# Then each model's test-split NELBO at B = 4 and B = L. Resumable: run it again to finish an interrupted run.
# About 25 minutes on 2 CPU cores.
set -euo pipefail
export HF_HUB_OFFLINE=1
OUT=${1:-runs/sweep-matched}
python examples/tiny/heldout_text.py --split data/tiny-corpus/test.jsonl --num 160 --out runs/heldout-160.jsonl
did sweep --model mix=runs/tiny-mix/final --model nomix=runs/tiny-nomix/final \
  --model nomix-long=runs/tiny-nomix-long/final --judge did-tiny-judge --num-samples 64 --batch-size 64 --seed 0 \
  --top-p 0.5,0.6,0.7,0.8,0.9,1.0 --remask snapshot,posthoc,random --gamma 0.1,0.25,0.5,0.75,1.0 \
  --refine-block-size 128 --reference runs/heldout-160.jsonl --out "$OUT"
python examples/tiny/nelbo.py --model runs/tiny-mix/final --model runs/tiny-nomix/final \
  --model runs/tiny-nomix-long/final --block-size 4,128 --json "$OUT/nelbo.json"

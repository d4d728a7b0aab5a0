#!/usr/bin/env bash
# The numbers in docs/tiny-models.md: gen PPL and entropy under did-tiny-judge for held-out real text, did-tiny's
# draft (B1 = 4) and its refinement (gamma 0.5, B2 = L), and the same for the no-mix fine-tune; 64 samples each.
# The entropy threshold is 3.5 rather than 4.0: 127-token samples cannot exceed ln(127) = 4.84 nats, and real
# held-out text of that length averages 4.07 (docs/tiny-models.md).
set -euo pipefail
export HF_HUB_OFFLINE=1
OUT=${1:-runs/measure}
mkdir -p "$OUT"
python examples/tiny/heldout_text.py --split data/tiny-corpus/test.jsonl --num 64 --out "$OUT/heldout.jsonl"
for model in did-tiny runs/tiny-nomix/final; do
  name=$( [ "$model" = did-tiny ] && echo mix || echo nomix )
  did draft -m "$model" -n 64 --batch-size 64 --seed 0 -q --out "$OUT/$name-draft.jsonl"
  did refine "$OUT/$name-draft.jsonl" -m "$model" --gamma 0.5 --batch-size 64 --seed 0 -q --out "$OUT/$name-refined.jsonl"
done
did eval-ppl "$OUT/heldout.jsonl" "$OUT/mix-draft.jsonl" "$OUT/mix-refined.jsonl" "$OUT/nomix-draft.jsonl" \
  "$OUT/nomix-refined.jsonl" --judge did-tiny-judge --degenerate-entropy 3.5 --json "$OUT/ppl.json"

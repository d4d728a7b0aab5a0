#!/usr/bin/env bash
# Quality cost of committing K tokens per model call (fewer NFEs) on did-tiny: draft and refine (gamma 0.5, B2 = L)
# with K = 1, 2, 4, 64 samples each, scored by did-tiny-judge. Writes $OUT/ppl.json and prints the table.
set -euo pipefail
export HF_HUB_OFFLINE=1
OUT=${1:-runs/tokens-per-call}
mkdir -p "$OUT"
files=()
for k in 1 2 4; do
  did draft -n 64 --batch-size 64 --seed 0 --tokens-per-call "$k" -q --out "$OUT/draft-k$k.jsonl"
  did refine "$OUT/draft-k$k.jsonl" --gamma 0.5 --batch-size 64 --seed 0 --tokens-per-call "$k" -q \
    --out "$OUT/refined-k$k.jsonl"
  files+=("$OUT/draft-k$k.jsonl" "$OUT/refined-k$k.jsonl")
done
did eval-ppl "${files[@]}" --judge did-tiny-judge --degenerate-entropy 3.5 --json "$OUT/ppl.json"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ppl = json.load(open(f"{out}/ppl.json"))["files"]
print("| K | stage | NFEs / sample (cumulative) | seconds / sample (cumulative) | gen PPL | entropy |")
print("|---|---|---|---|---|---|")
for k in (1, 2, 4):
    for stage in ("draft", "refined"):
        path = f"{out}/{stage}-k{k}.jsonl"
        records = [json.loads(line) for line in open(path)]
        nfes = sum(sum(s["nfes"] for s in r["stages"]) for r in records) / len(records)
        secs = sum(sum(s["seconds"] for s in r["stages"]) for r in records) / len(records)
        row = ppl[path]
        print(f"| {k} | {stage} | {nfes:.1f} | {secs:.3f} | {row['gen_ppl']:.1f} | {row['entropy']:.3f} |")
PY

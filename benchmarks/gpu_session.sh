#!/usr/bin/env bash
# The prepared device check, sized for about 8 minutes of one GPU: CUDA correctness tests first, then the tables of
# docs/benchmarks.md for the 110M BD3-LM shape at L = 1024, most important first, each step under its own timeout so
# one slow step cannot eat the budget of the rest. Run from the repository root; results land in $OUT (or
# ./gpu-results), one file per step, with the command that printed it on its first line.
set -uo pipefail
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/did-inductor}
START=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run with a timeout, tee to $OUT/NAME, note the elapsed time
  local name=$1 limit=$2
  shift 2
  echo "\$ $*" >"$OUT/$name"
  local tic=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name"
  echo "[$name: exit ${PIPESTATUS[0]}, $((SECONDS - tic)) s, $((SECONDS - START)) s total]" | tee -a "$OUT/$name"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
SMALL=(--shape small --length 1024 --device cuda)

# 1. Correctness on the device: cached = uncached, batch invariance, bf16, graphs/compile = eager, flex grads = SDPA.
step gpu_tests.txt 120 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
# 2. Decoding calls, eager vs CUDA graphs (target: batch-1 cached call <= 1 ms with graphs), bf16.
step decoding_bf16.md 60 $PY -m benchmarks.decoding "${SMALL[@]}" --dtype bfloat16 --block-sizes 4,16,1024 \
  --batch-sizes 1,16,64 --modes eager,graphs
# 3. Training step, dense SDPA vs flex attention, bf16 autocast, with MFU (target: >= 40% MFU).
step training_sdpa.md 45 $PY -m benchmarks.training "${SMALL[@]}" --mix 4,16,1024 --batch-size 16 --attn-backend sdpa
step training_flex.md 75 $PY -m benchmarks.training "${SMALL[@]}" --mix 4,16,1024 --batch-size 16 --attn-backend flex
# 4. Drafting at batch 64 (graphs) against the upstream-style uncached sampler at batch 1 (target: >= 50x), B = 4.
step draft_target.md 60 $PY -m benchmarks.sampling "${SMALL[@]}" --dtype bfloat16 --batch-sizes 64 --num-samples 64 \
  --no-refine --cuda-graphs --warmup 1 --no-baseline
step draft_baseline.md 40 $PY -m benchmarks.sampling "${SMALL[@]}" --dtype bfloat16 --batch-sizes 1 --num-samples 1 \
  --no-refine --baseline-calls 64 --warmup 1 --attn-backend sdpa
# 5. Compiled decoding (inductor compiles each shape once; the slow part, so it runs last).
step decoding_compiled_bf16.md 90 $PY -m benchmarks.decoding "${SMALL[@]}" --dtype bfloat16 --block-sizes 4,1024 \
  --batch-sizes 1,64 --modes compiled,compiled+graphs
# 6. Memory: gradient checkpointing against plain training.
step training_checkpointing.md 30 $PY -m benchmarks.training "${SMALL[@]}" --mix 4 --batch-size 16 --steps 3 \
  --gradient-checkpointing
echo "done in $((SECONDS - START)) s" | tee "$OUT/done.txt"

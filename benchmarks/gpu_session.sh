#!/usr/bin/env bash
# The prepared device check: CUDA correctness tests, then sampling and training benchmarks of the 110M BD3-LM shape.
# Run from the repository root on the GPU machine; results land in $OUT (or ./gpu-results).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
python -m benchmarks.sampling --shape small --length 1024 --device cuda --dtype bfloat16 --batch-sizes 1,16,64 \
  2>&1 | tee "$OUT/sampling_bf16.md"
python -m benchmarks.sampling --shape small --length 1024 --device cuda --dtype float32 --batch-sizes 1,16 \
  --no-refine 2>&1 | tee "$OUT/sampling_fp32.md"
python -m benchmarks.sampling --shape small --length 1024 --device cuda --dtype bfloat16 --batch-sizes 16 \
  --tokens-per-call 4 --no-baseline 2>&1 | tee "$OUT/sampling_bf16_k4.md"
python -m benchmarks.training --shape small --length 1024 --mix 4,16,1024 --batch-size 16 --device cuda \
  2>&1 | tee "$OUT/training.md"
# Before/after for the sync-free sampler loop: the previous commit's did_cli (carried in scratch/old) under the
# same benchmark script, drafting only.
if [ -d scratch/old/did_cli ]; then
  (cd scratch/old && PYTHONPATH=$OLDPWD python -m benchmarks.sampling --shape small --length 1024 --device cuda \
    --dtype bfloat16 --batch-sizes 1,16 --no-refine --no-baseline 2>&1 | tee "$OUT/sampling_bf16_before.md")
fi

#!/usr/bin/env bash
# Rebuild the embedded models from scratch: corpus, tokenizer, diffusion pretrain, mix-scale and no-mix
# fine-tunes, the GPT-2 judge, then ship did-tiny and did-tiny-judge into the package and measure them.
# Everything is seeded; on the same library versions and thread count the shipped files come out bit for bit.
# About 3 hours on 2 CPU cores: the five training runs take 146 minutes (docs/tiny-models.md times each one), the
# ablations of step 7 about 25. Run from the repository root with the project installed (pip install -e .).
set -euo pipefail
export HF_HUB_OFFLINE=1

# 1. Corpus: the World English Bible (public domain), from Debian's sword-text-web package.
if [ ! -d /usr/share/sword/modules/texts/ztext/engWEB2015eb ]; then  # the module prepare_corpus.py reads
  apt-get install -y --no-install-recommends sword-text-web
fi
python examples/tiny/prepare_corpus.py --out data/tiny-corpus --seed 0
# 2. A 4096-token byte-level BPE tokenizer trained on the train split.
python examples/tiny/train_tokenizer.py --corpus data/tiny-corpus --out data/tiny-tokenizer --vocab-size 4096

DATA="--data data/tiny-corpus/train.jsonl --valid-data data/tiny-corpus/valid.jsonl --seq-len 128"
COMMON="--batch-size 32 --micro-batch-size 32 --clip 0.1,1.0 --ema 0.999 --val-batches 12 --seed 0"

# 3. Global-block pretrain (--mix L:1, i.e. MDLM) of the tiny preset (4 layers, width 256, 5.7M parameters).
did finetune --init tiny --tokenizer data/tiny-tokenizer $DATA $COMMON --mix 128:1 --steps 1500 --lr 1e-3 \
  --warmup 200 --save-every 250 --val-every 250 --log-every 50 --out runs/tiny-pretrain --overwrite

# 4. Fine-tunes from the same pretrain: mix-scale (the DiD model) and small blocks only (the no-mix ablation).
did finetune --model runs/tiny-pretrain/final $DATA $COMMON --mix 4:0.9,128:0.1 --steps 400 --lr 5e-4 --warmup 20 \
  --save-every 100 --val-every 100 --log-every 25 --out runs/tiny-mix --overwrite
did finetune --model runs/tiny-pretrain/final $DATA $COMMON --mix 4:1 --steps 400 --lr 5e-4 --warmup 20 \
  --save-every 100 --val-every 100 --log-every 25 --out runs/tiny-nomix --overwrite
# The no-mix baseline at the paper's budget ratio: its standard BD3-LM baseline had ~4x DiD's small-block training
# (150K steps against 40K), so 1600 steps against the mix-scale fine-tune's 400 (71 minutes in docs/tiny-models.md).
did finetune --model runs/tiny-pretrain/final $DATA $COMMON --mix 4:1 --steps 1600 --lr 5e-4 --warmup 20 \
  --save-every 200 --val-every 200 --log-every 50 --out runs/tiny-nomix-long --overwrite

# 5. The judge: a standard transformers GPT-2 (4 layers, width 256) on the same corpus and tokenizer.
python examples/tiny/train_judge.py --tokenizer data/tiny-tokenizer --data data/tiny-corpus/train.jsonl \
  --valid-data data/tiny-corpus/valid.jsonl --steps 1000 --out runs/tiny-judge

# 6. Ship (bf16 weights) and measure.
python examples/tiny/ship.py --model runs/tiny-mix/final --judge runs/tiny-judge/final
bash examples/tiny/measure.sh
# 7. The ablations of docs/ablations.md: entropy-matched sweeps of the three fine-tunes and their NELBO.
bash examples/tiny/ablations.sh

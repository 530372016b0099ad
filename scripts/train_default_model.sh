#!/usr/bin/env bash
# The real training run of the shipped default model, on one GPU (H100/H200): a few minutes.
#
#   OUT_DIR=/somewhere scripts/train_default.sh [extra train_default_model.py args]
#
# Extra args override the ones below (argparse keeps the last); DEVICE=cpu with small
# --max-steps/--batch-size/--seq-len checks the whole command on a CPU.
#
# Needs, in the repository:
#   .corpus/corpus-py311.txt.gz and .corpus/corpus-py311.json: the corpus built on the dev
#       machine (Python 3.11) by scripts/build_corpus.py. Carry both: the GPU machine's
#       Python 3.12 stdlib is a different corpus, and the tokenizer was trained on this one.
#   models/default/tokenizer.model (committed; scripts/train_tokenizer.py rebuilds it exactly).
# Writes $OUT_DIR/default/: config.json, model.safetensors (bf16), tokenizer.model,
# training.json and train-log.jsonl (train/val loss per step). Then, on the dev machine:
#   cp $OUT_DIR/default/{config.json,model.safetensors,training.json,train-log.jsonl} models/default/
#
# The run stops at --max-steps (3000 x 32 x 1024 tokens = 98M tokens, ~10.7 epochs of the
# 9.2M-token train split) or when --time-budget-s runs out, whichever comes first; with the
# budget, the cosine schedule is fitted to the steps that fit after 25 timed steps. The best
# validation checkpoint is the one saved.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT_DIR:-out}"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
CORPUS=.corpus/corpus-py311.txt.gz

for f in "$CORPUS" "${CORPUS%.txt.gz}.json" models/default/tokenizer.model; do
    if [[ ! -f "$f" ]]; then
        echo "missing $f (build it on the dev machine: scripts/build_corpus.py," \
            "scripts/train_tokenizer.py)" >&2
        exit 2
    fi
done
if [[ "$DEVICE" == cuda* ]]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
fi

mkdir -p "$OUT_DIR/default"
"$PYTHON" scripts/train_default_model.py \
    --corpus "$CORPUS" \
    --tokenizer models/default/tokenizer.model \
    --config configs/default.toml \
    --out "$OUT_DIR/default" \
    --log "$OUT_DIR/default/train-log.jsonl" \
    --seed 1234 \
    --seq-len 1024 \
    --batch-size 32 \
    --lr 2e-3 \
    --warmup 200 \
    --max-steps 3000 \
    --eval-every 100 \
    --log-every 10 \
    --time-budget-s 300 \
    --device "$DEVICE" \
    --compile \
    "$@"
ls -l "$OUT_DIR/default"

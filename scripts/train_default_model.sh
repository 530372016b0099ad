#!/usr/bin/env bash
# The real training run of the shipped default model, on one GPU (H100/H200), in one call:
#
#   bash scripts/train_default_model.sh BUDGET_S [extra train_default_model.py args]
#
# BUDGET_S: wall-clock seconds for the training script in all (loading the corpus, compiling,
# training, the evaluations and the save); the schedule is fitted to it. Extra args override
# the ones below (argparse keeps the last); DEVICE=cpu with a tiny --config, --batch-size and
# --seq-len checks the whole command on a CPU (tests/test_train_default_script.py does).
#
# Needs only torch and safetensors on the machine (no sentencepiece, no install of toyllm: the
# reference model is imported from this checkout), and, in the checkout:
#   .corpus/packed/: the corpus tokenised on the dev machine (scripts/build_corpus.py,
#       scripts/train_tokenizer.py, scripts/pack_corpus.py): train.u16.xz, val.u16.xz,
#       tokenizer.model, tokenizer-training.json, meta.json. Carry it (git ignores it).
# Writes $OUT/default/ (OUT defaults to ./out): config.json, model.safetensors (bf16),
# tokenizer.model, tokenizer-training.json, training.json, train-log.jsonl (train/val loss per
# step); and $OUT/train-stdout.txt. With PACK_FOR_DEVICE=1 the directory leaves as tar parts
# (the end of this script says how to unpack them). Then, on the dev machine, the new model replaces the old:
#   cp $OUT/default/* models/default/
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S="${1:?usage: bash scripts/train_default_model.sh BUDGET_S [train_default_model.py args]}"
shift
OUT="${OUT:-out}"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
DATA="${DATA:-.corpus/packed}"
CONFIG="${CONFIG:-configs/default.toml}"

for f in meta.json train.u16.xz val.u16.xz tokenizer.model; do
    if [[ ! -f "$DATA/$f" ]]; then
        echo "missing $DATA/$f (build it on the dev machine: scripts/pack_corpus.py)" >&2
        exit 2
    fi
done
# toyllm.models without installing toyllm: a package directory of symlinks into this checkout
PYSRC="$(mktemp -d)"
trap 'rm -rf "$PYSRC"' EXIT
mkdir "$PYSRC/toyllm"
ln -s "$PWD/models" "$PYSRC/toyllm/models"
ln -s "$PWD/configs" "$PYSRC/toyllm/configs"
export PYTHONPATH="$PYSRC${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, safetensors; print('torch', torch.__version__)"
if [[ "$DEVICE" == cuda* ]]; then
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'; \
print('on', torch.cuda.get_device_name())"
fi

mkdir -p "$OUT/default"
"$PYTHON" scripts/train_default_model.py \
    --data "$DATA" \
    --config "$CONFIG" \
    --out "$OUT/default" \
    --log "$OUT/default/train-log.jsonl" \
    --seed 1234 \
    --seq-len 1024 \
    --batch-size 64 \
    --lr 1.5e-3 \
    --min-lr-ratio 0.1 \
    --warmup 200 \
    --max-steps 100000 \
    --eval-every 250 \
    --log-every 25 \
    --time-budget-s "$BUDGET_S" \
    --device "$DEVICE" \
    --compile \
    "$@" 2>&1 | tee "$OUT/train-stdout.txt"
if [[ -f "$DATA/tokenizer-training.json" ]]; then
    cp "$DATA/tokenizer-training.json" "$OUT/default/"
fi
ls -l "$OUT/default"
# PACK_FOR_DEVICE=1: the device tool brings back at most 8 files of 16 MiB each, so the checkpoint
# directory leaves as one tar in 15 MiB parts; on the dev machine:
#   cat default.tar.part.* | tar -x -C out   (then cp out/default/* models/default/)
if [[ "${PACK_FOR_DEVICE:-0}" == 1 ]]; then
    tar -C "$OUT" -cf - default | split -b 15M -d - "$OUT/default.tar.part."
    rm -r "$OUT/default"
    ls -l "$OUT"
fi

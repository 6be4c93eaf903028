#!/usr/bin/env bash
# SimCLR on CIFAR-10 on one GPU in at most 7 minutes of wall time (BUDGET, set-up, extraction
# and k-NN included), then k-NN (k=20, 200) of the encoder on the test split (featcache knn).
#
# Settings follow the published CIFAR-10 recipes (ResNet-18 with a 3x3 stem, batch 512, SGD
# lr 0.06 x batch/256 with warm-up and cosine decay, weight decay 5e-4, T=0.5; lightly reports
# 84.7% k-NN after 200 epochs) with bf16 autocast and augmentations on the GPU. Pretraining gets
# what the budget leaves after set-up and a reserve for loading, extraction and k-NN; during
# warm-up featcache sizes the cosine schedule to end within it (at most EPOCHS epochs).
#
# On the device machine, after bench/device_check.sh and only with 9 or more minutes of
# device time left: `device run` with carry [".device"] and about 450 s of timeout:
#   bash bench/simclr_gpu.sh          # history.json, knn.json and curves.png go to $OUT
# A few CPU steps: EPOCHS=1 WIDTH=8 PER_CLASS=20 BATCH=64 DEVICE=cpu bash bench/simclr_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUDGET=${BUDGET:-420}
RESERVE=${RESERVE:-75}
RUN=${RUN:-runs/simclr-gpu}
EPOCHS=${EPOCHS:-200}
WIDTH=${WIDTH:-64}
BATCH=${BATCH:-512}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-auto}
PER_CLASS=${PER_CLASS:-}
subset=()
[ -n "$PER_CLASS" ] && subset=(--train-per-class "$PER_CLASS" --test-per-class "$PER_CLASS")

copy_results() {  # whatever exists, also after a failure (the checkpoints are too large)
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  for f in history.json knn.json curves.png; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
  return 0
}
trap copy_results EXIT

source bench/device_env.sh
LIMIT=${LIMIT:-$((BUDGET - RESERVE - ($(date +%s) - start)))}
echo "pretraining for at most $LIMIT s"
mkdir -p "$(dirname "$RUN")"
"$PY" -m featcache pretrain simclr --dataset "imagefolder:$DATA" --out "$RUN" \
  --width "$WIDTH" --epochs "$EPOCHS" --batch-size "$BATCH" --lr 0.06 --warmup-epochs 10 \
  --temperature 0.5 --knn-every 50 --checkpoint-every 10 --device "$DEVICE" \
  --precision "$PRECISION" --time-limit "$LIMIT" "${subset[@]}"
"$PY" -m featcache extract --backbone simclr-resnet18 --weights "$RUN" \
  --dataset "imagefolder:$DATA" --out "$RUN/features.h5" --device "$DEVICE" \
  --batch-size 1024 --no-progress --overwrite "${subset[@]}"
"$PY" -m featcache knn --store "$RUN/features.h5" --k 20,200 --json "$RUN/knn.json"
echo "wall time: $(($(date +%s) - start)) s"

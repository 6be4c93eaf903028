#!/usr/bin/env bash
# SimCLR on CIFAR-10 on one GPU in at most 15 minutes, then k-NN of the encoder (featcache knn).
#
# Settings follow the published CIFAR-10 recipes (ResNet-18 with a 3x3 stem, batch 512, SGD
# lr 0.06 x batch/256 with warm-up and cosine decay, weight decay 5e-4, T=0.5; lightly reports
# 84.7% k-NN after 200 epochs) with bf16 autocast and augmentations on the GPU. The time limit
# stops the run at an epoch end before 15 minutes; the cosine schedule is sized by EPOCHS.
#
#   bash bench/simclr_gpu.sh                       # on a GPU machine
#   EPOCHS=1 WIDTH=8 PER_CLASS=20 DEVICE=cpu bash bench/simclr_gpu.sh   # a few CPU steps
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/cifar10-jpeg}
OUT=${OUT:-runs/simclr-gpu}
EPOCHS=${EPOCHS:-200}
WIDTH=${WIDTH:-64}
BATCH=${BATCH:-512}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-auto}
LIMIT=${LIMIT:-780}
PER_CLASS=${PER_CLASS:-}

if [ ! -d "$DATA/train" ]; then
  mkdir -p "$DATA"
  for s in train test; do tar -xzf ../shared/data/cifar10-jpeg/$s.tar.gz -C "$DATA"; done
fi
subset=()
[ -n "$PER_CLASS" ] && subset=(--train-per-class "$PER_CLASS" --test-per-class "$PER_CLASS")

start=$(date +%s)
$PY -m featcache pretrain simclr --dataset "imagefolder:$DATA" --out "$OUT" \
  --width "$WIDTH" --epochs "$EPOCHS" --batch-size "$BATCH" --lr 0.06 --warmup-epochs 10 \
  --temperature 0.5 --knn-every 20 --device "$DEVICE" --precision "$PRECISION" \
  --time-limit "$LIMIT" "${subset[@]}"
$PY -m featcache extract --backbone simclr-resnet18 --weights "$OUT" \
  --dataset "imagefolder:$DATA" --out "$OUT/features.h5" --device "$DEVICE" \
  --batch-size 1024 --workers 4 --no-progress "${subset[@]}"
$PY -m featcache knn --store "$OUT/features.h5" --k 20,200 --json "$OUT/knn.json"
echo "wall time: $(( $(date +%s) - start )) s"

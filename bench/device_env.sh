# Sourced by the GPU recipes (device_check.sh, simclr_gpu.sh, gpu.sh), from the repository root.
# Sets PY (a Python with featcache) and DATA (CIFAR-10 as image folders, unpacked once).
#
# PY, if set, is used as it is. Else the project's .venv where there is one (this machine).
# Else (the device machine, where no .venv travels) a virtual environment that sees the GPU
# image's own packages (torch, transformers, timm, ...) and holds the wheels that
# bench/device_pack.sh put into .device/wheels, with featcache installed --no-deps.
# DEVICE_VENV=1 builds that environment here too, from BASE_PYTHON (default python3).

if [ -z "${PY:-}" ] && [ -x .venv/bin/python ] && [ -z "${DEVICE_VENV:-}" ]; then
  PY=.venv/bin/python
elif [ -z "${PY:-}" ]; then
  base=${BASE_PYTHON:-python3}
  venv=${DEVICE_VENV_DIR:-/tmp/featcache-venv}
  [ -d .device/wheels ] || { echo "no .device/wheels: run bench/device_pack.sh first" >&2; exit 1; }
  rm -rf "$venv"
  "$base" -m venv --without-pip "$venv"
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The image's packages, after the environment's own (a .pth line appends a path).
  "$base" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    > "$site/_image_packages.pth"
  "$base" -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl
  if ! "$base" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . ; then
    echo "device_env: featcache could not be built here; importing it from $PWD instead" >&2
    pwd > "$site/featcache-source.pth"
  fi
  PY=$venv/bin/python
fi
export PY

DATA=${DATA:-data/cifar10-jpeg}
for split in train test; do
  if [ ! -d "$DATA/$split" ]; then
    tarball=.device/cifar10-jpeg/$split.tar.gz
    [ -f "$tarball" ] || tarball=../shared/data/cifar10-jpeg/$split.tar.gz
    mkdir -p "$DATA" && tar -xzf "$tarball" -C "$DATA"
  fi
done
export DATA

# Sourced by the GPU recipes (device_check.sh, simclr_gpu.sh, gpu.sh). Sets PY (a Python with
# featcache) and DATA (CIFAR-10 as image folders, unpacked once).
#
# PY, if set, is used as it is. Else the project's .venv where there is one (this machine).
# Else (the device machine, where no .venv travels) a virtual environment that sees the GPU
# image's own packages (torch, transformers, timm, ...) and holds the wheels that
# bench/device_pack.sh put into PACK/wheels (PACK: .device), with featcache installed --no-deps.
# DEVICE_VENV=1 builds that environment here too, from BASE_PYTHON (default python3).

_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PACK=${PACK:-$_repo/.device}
if [ -z "${PY:-}" ] && [ -x "$_repo/.venv/bin/python" ] && [ -z "${DEVICE_VENV:-}" ]; then
  PY=$_repo/.venv/bin/python
elif [ -z "${PY:-}" ]; then
  _base=${BASE_PYTHON:-python3}
  _venv=${DEVICE_VENV_DIR:-/tmp/featcache-venv}
  _wheels=$(ls "$PACK"/wheels/*.whl 2>/dev/null || true)
  [ -n "$_wheels" ] || { echo "no wheels in $PACK/wheels: run bench/device_pack.sh first" >&2; exit 1; }
  rm -rf "$_venv"
  "$_base" -m venv --without-pip "$_venv"
  _site=$("$_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # The image's packages after the environment's own; addsitedir also runs their .pth files
  # (the image's python3 is itself a virtual environment, which a new one would not see).
  "$_base" -c 'import sys
for p in sys.path:
    if p.endswith(("site-packages", "dist-packages")):
        print(f"import site; site.addsitedir({p!r})")' > "$_site/_image_packages.pth"
  # shellcheck disable=SC2086  # one wheel per word
  "$_base" -m pip install -q --no-index --no-deps --no-compile --target "$_site" $_wheels
  if ! "$_base" -m pip install -q --no-index --no-deps --no-build-isolation --target "$_site" "$_repo"; then
    echo "device_env: featcache could not be built here; importing it from $_repo instead" >&2
    echo "$_repo" > "$_site/featcache-source.pth"
  fi
  PY=$_venv/bin/python
fi
export PY

DATA=${DATA:-$_repo/data/cifar10-jpeg}
for _split in train test; do
  if [ ! -d "$DATA/$_split" ]; then
    _tarball=$PACK/cifar10-jpeg/$_split.tar.gz
    [ -f "$_tarball" ] || _tarball=$_repo/../shared/data/cifar10-jpeg/$_split.tar.gz
    mkdir -p "$DATA" && tar -xzf "$_tarball" -C "$DATA"
  fi
done
export DATA

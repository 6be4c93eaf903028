#!/usr/bin/env bash
# Installs featcache with its test extras into the virtual environment at $1 (the Makefile's
# set-up step).
#
# uv installs the same pinned wheels as pip in about 40 s where pip takes about 85 s on two cores
# (torch pulls 2.5 GB of CUDA wheels; uv unpacks them in parallel). Like pip it compiles the
# bytecode at install: where PYTHONDONTWRITEBYTECODE is set (as here) nothing else would, and
# every process would compile torch again (imports 13 s instead of 6). uv does not read pip's
# configuration, so the package sources pip is configured with (`pip config list`: index, extra
# indexes, find-links, constraints) are handed to it, with pip's rule of taking the best version
# across all of them. Where uv cannot be installed or fails, pip installs the project as before.
set -euo pipefail
venv="$1"
py="$venv/bin/python"

"$py" -m pip install -q --upgrade pip
if "$py" -m pip install -q uv 2>/dev/null; then
  mapfile -t sources < <("$py" - <<'EOF'
import shlex
import subprocess
import sys

flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links", "constraint": "--constraint"}
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                        capture_output=True, text=True).stdout
given = []
for line in listed.splitlines():  # e.g. global.extra-index-url='file:///a file:///b'
    name, _, value = line.partition("=")
    key, value = name.rsplit(".", 1)[-1], " ".join(shlex.split(value))
    if key == "no-index" and value.lower() in ("1", "true", "yes", "on"):
        given.append(("--no-index", None))
    for item in value.split() if key in flags else []:
        given.append((flags[key], item))
for flag, item in dict.fromkeys(given):  # each once, in pip's order
    print(flag)
    if item is not None:
        print(item)
print("--index-strategy")
print("unsafe-best-match")
EOF
  )
  if "$venv/bin/uv" pip install -q --compile-bytecode --python "$py" "${sources[@]}" -e '.[test]'; then
    exit 0
  fi
  echo "uv could not install the project; pip installs it instead" >&2
fi
"$py" -m pip install -q -e '.[test]'

# Set-up is part of every target: the project's virtual environment is made when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: test test-all demo bench lint clean

$(STAMP): pyproject.toml scripts/install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1: on local disk here)
	bash scripts/install.sh $(VENV)
	rm -f $(VENV)/.installed-* && touch $@

# Debian's Chromium for the report's browser test (skipped where it cannot be installed,
# except in CI, which requires it).
$(VENV)/.chromium: | $(STAMP)
	command -v chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "chromium could not be installed: the browser test will be skipped"
	touch $@

# One pytest-xdist worker per core (tests/conftest.py gives each its share of the threads);
# `make test JOBS=0` runs in one process.
JOBS ?= auto
test: $(STAMP) $(VENV)/.chromium   ## the default suite (slow tests skipped)
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal

test-all: $(STAMP) $(VENV)/.chromium   ## everything, slow tests included
	$(PY) -m pytest -q -n $(JOBS) --dist worksteal --runslow

demo: $(STAMP)           ## extract, probe and k-NN with efficientnet-lite0 on CIFAR-10
	$(PY) scripts/demo.py

bench: $(STAMP)          ## side-by-side benchmarks, written to BENCHMARKS.md
	$(PY) -m pip install -q --no-deps open_clip_torch  # CLIP's BPE vocabulary (zeroshot)
	$(PY) bench/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check featcache tests scripts bench

clean:
	rm -rf runs .pytest_cache

"""`python tests/tinycli.py ARGS` runs the featcache CLI with the tiny test backbone registered."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny_backbone  # noqa: E402,F401  (registers test-tiny)

from featcache.cli import main  # noqa: E402

if __name__ == "__main__":
    main()

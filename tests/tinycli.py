"""`python tests/tinycli.py ARGS` runs the featcache CLI with the tiny test backbone registered;
`ARGS --- ARGS ...` runs several command lines one after another in one process, as a script
that calls stage after stage would.

Fault injection for the crash tests, by environment variable (test harness only):
    FEATCACHE_TEST_STALL=commit:K   before the K-th commit (temporary file written, not yet
                                    renamed): touch $FEATCACHE_TEST_MARK, then sleep
    FEATCACHE_TEST_STALL=assemble   while publishing the store (its attributes written, the
                                    file not yet renamed): the same
    FEATCACHE_TEST_ENOSPC=K         the K-th commit fails with ENOSPC (disk full)
"""

import errno
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tiny_backbone  # noqa: E402,F401  (registers test-tiny)

from featcache import io  # noqa: E402
from featcache.cli import main  # noqa: E402
from featcache.store import writer  # noqa: E402


def _stall():
    Path(os.environ["FEATCACHE_TEST_MARK"]).touch()
    time.sleep(600)


def _install_faults():
    stall = os.environ.get("FEATCACHE_TEST_STALL", "")
    enospc = int(os.environ.get("FEATCACHE_TEST_ENOSPC", "0"))
    commit, calls = io.commit, [0]

    def faulty_commit(tmp, final):
        calls[0] += 1
        if stall == f"commit:{calls[0]}":
            _stall()
        if calls[0] == enospc:
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(tmp))
        commit(tmp, final)

    io.commit = faulty_commit
    if stall == "assemble":
        write_run_attrs = writer.ShardedWriter._write_run_attrs

        def slow_write_run_attrs(self, meta):
            write_run_attrs(self, meta)
            _stall()

        writer.ShardedWriter._write_run_attrs = slow_write_run_attrs


if __name__ == "__main__":
    _install_faults()
    commands, args = [], []
    for arg in [*sys.argv[1:], "---"]:
        if arg == "---":
            commands.append(args)
            args = []
        else:
            args.append(arg)
    for args in commands[:-1]:
        main(args, standalone_mode=False)
    main(commands[-1])

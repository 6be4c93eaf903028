"""Files written whole or not at all, sizes as users write them, and output paths checked first.

One mechanism each: every file featcache writes (shards, stores, results, reports,
checkpoints) goes through ``write_atomic`` or ``commit``; every size option through
``parse_size``; every output path through ``check_output``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from featcache.errors import ArgumentError, OutputError, StoreError


def check_output(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a Path whose folder exists, else an OutputError that says what to do."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(
            f"{option} {path}: directory {path.parent} does not exist; create it first"
        )
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file and rename it into place atomically."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


SHARDS_KEPT = "; the shards finished so far are kept and will not be redone"


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left" in str(exc))


def disk_full(what: str, detail: str = "", kept: str = SHARDS_KEPT) -> StoreError:
    return StoreError(
        f"disk full while writing the {what}{detail}: free some space and rerun the same "
        f"command{kept}"
    )


@contextlib.contextmanager
def cleanup_on_failure(tmp: Path, what: str, kept: str = SHARDS_KEPT):
    """Remove a half-written temporary file; a full disk becomes a clear error."""
    try:
        yield
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(what, kept=kept) from exc
        raise


def write_atomic(path: str | Path, data: str | bytes, kept: str = "") -> None:
    """Write a file whole or not at all: a temporary file of its own beside it (two writers
    never share one), fsynced, then renamed over ``path``.

    A full disk is a StoreError; ``kept`` ends its message (what the failure did not lose).
    """
    path = check_output(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    with cleanup_on_failure(tmp, f"file {path}", kept=kept):
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        commit(tmp, path)


def parse_size(text: str) -> int:
    """Bytes of a size such as ``2GiB``, ``512MiB``, ``1.5GB`` or ``1000000``."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
    number = text.strip().lower().rstrip("bikmgt")
    unit = text.strip().lower()[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ArgumentError(
            f"cannot read {text!r} as a size; write e.g. 2GiB, 512MiB or 1e9"
        ) from None
    if value < 1:
        raise ArgumentError(f"size {text!r} is less than one byte")
    return int(value)

"""Writing a store: rows in place in a preallocated temporary store, a journal of finished
shards, and one rename when every shard is in.

While extracting, ``STORE.h5.parts/`` holds:

- ``spec.json``: the fingerprint fields (what partial work belongs to);
- ``store.h5``: the store itself, every dataset allocated at its full size (contiguous, so
  that a shard's rows are plain byte ranges of the file) and every attribute present;
- ``layout.json``: each dataset's byte offset in ``store.h5`` and the shapes it was made for;
- ``<split>-<index>.done``: one journal entry per finished shard (its rows, skipped images and
  seconds), written after the shard's rows are written and fsynced.

A shard's rows are written with ``pwrite`` into space allocated when the store was made, so
HDF5 never touches the file after it was made, and a kill -9 at any point leaves a valid HDF5
file: rows of unfinished shards are simply not in the journal and are written again. When
every shard is in, the run's attributes (config, extraction, fixed-size) are overwritten in
place and the file is renamed to ``STORE.h5``: no feature is read or written twice. Only a
run that skipped unreadable images copies its rows once more, leaving those rows out.

Under torchrun every rank writes its own shards into the same file at their own rows; rank 0
makes the file (before a barrier) and publishes it (after one).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache import __version__, io
from featcache.errors import SpecMismatchError, StoreError
from featcache.store.format import (
    FORMAT,
    fingerprint,
    first_difference,
    storage_dtype,
    versioned,
)
from featcache.store.reader import stored_spec

# Lock files this process holds (POSIX locks do not exclude their own process).
_HELD: set[Path] = set()

# Bytes reserved for each attribute written when the run ends (JSON of a few KiB).
RUN_ATTRS = ("config", "extraction")
_RUN_ATTR_BYTES = 16384


@dataclass(frozen=True)
class SplitLayout:
    """What one split of a store holds: ``rows`` samples, ids of at most ``id_bytes`` UTF-8
    bytes, and per-sample arrays by path (``features/cls``: (384,), ``views/cls``: (3, 384))."""

    rows: int
    id_bytes: int
    arrays: dict[str, tuple[int, ...]]

    def to_dict(self) -> dict:
        return {**asdict(self), "arrays": {k: list(v) for k, v in self.arrays.items()}}


class ShardedWriter:
    """Writes the shards of one extraction into its temporary store and publishes the store.

    Creating it only checks the target, touching nothing: a finished store, or partial work
    with another fingerprint, is refused (naming the differing field) unless ``overwrite``; a
    finished store with the same fingerprint sets ``complete``. ``begin()`` then takes an
    exclusive lock on the work folder, so two extractions into one store cannot interleave.
    The lock dies with the process that took it (not with its forked loader workers).
    """

    def __init__(self, out: Path, fields: dict, overwrite: bool = False):
        self.out = io.check_output(out)
        self.fields = versioned(fields)
        self.fp = fingerprint(self.fields)
        self.overwrite = overwrite
        self.parts = self.out.with_name(self.out.name + ".parts")
        self.temp = self.parts / "store.h5"
        self._fd: int | None = None
        self.complete = False
        if self.out.exists():
            recorded, stored = stored_spec(self.out)
            if recorded == self.fp:
                self.complete = True
                self._remove_leftover_parts()
                return
            if not overwrite:
                why = first_difference(stored, fields) if stored else "it is not a featcache store"
                raise SpecMismatchError(
                    f"{self.out} already exists with another spec ({why}); choose another --out "
                    "or pass --overwrite to replace it"
                )
        self._check_partial()

    # -- starting -------------------------------------------------------------------------

    def _remove_leftover_parts(self) -> None:
        """A kill between publishing and removing the work folder leaves it (with a
        store-sized file where images were skipped): removed, unless a writer holds it."""
        if not self.parts.is_dir():
            return
        try:
            self._take_lock((self.parts / "lock").resolve())
        except StoreError:
            return  # another extraction (another spec, --overwrite) is working there
        try:
            shutil.rmtree(self.parts, ignore_errors=True)
        finally:
            self.close()

    def _check_partial(self) -> None:
        """Refuse partial work of another spec unless overwrite (``begin`` then clears it)."""
        spec_path = self.parts / "spec.json"
        if not spec_path.exists() or not any(self.parts.glob("*.done")):
            return
        try:
            stored = versioned(json.loads(spec_path.read_text()))
        except FileNotFoundError:  # rank 0 of a torchrun is replacing it meanwhile
            return
        if fingerprint(stored) != self.fp and not self.overwrite:
            raise SpecMismatchError(
                f"{self.parts} holds a partial extraction with another spec "
                f"({first_difference(stored, self.fields)}); rerun the original command to "
                "finish it, or pass --overwrite to discard it"
            )

    def begin(
        self, layout: dict[str, SplitLayout] | None = None, attrs: dict | None = None, rank: int = 0
    ) -> None:
        """Lock the work folder; rank 0 records the spec and makes the temporary store (shards
        of an earlier run of the same spec and layout are kept), ``attrs`` (JSON-able values)
        as its attributes. Other ranks begin after rank 0 (a barrier in the caller), as does a
        writer without a ``layout``: it joins the work recorded there."""
        self.parts.mkdir(exist_ok=True)
        self._take_lock((self.parts / ("lock" if rank == 0 else f"lock.{rank}")).resolve())
        try:
            if rank == 0 and layout is not None:
                self._check_partial()  # checked again under the lock
                self._prepare(layout, attrs or {})
            elif not (self.parts / "layout.json").exists():
                raise StoreError(f"{self.parts} holds no extraction to join")
            self.layout = json.loads((self.parts / "layout.json").read_text())
            self._fd = os.open(self.temp, os.O_WRONLY)
        except BaseException:
            self.close()  # the lock too: a failed begin must not keep the store busy
            raise

    def _prepare(self, layout: dict[str, SplitLayout], attrs: dict) -> None:
        spec_path, layout_path = self.parts / "spec.json", self.parts / "layout.json"
        shapes = {name: s.to_dict() for name, s in layout.items()}
        recorded = spec_path.exists() and versioned(json.loads(spec_path.read_text()))
        kept = (
            recorded
            and fingerprint(recorded) == self.fp
            and self.temp.exists()
            and layout_path.exists()
            and json.loads(layout_path.read_text())["splits"] == shapes
        )
        if kept:
            return
        for p in self.parts.iterdir():  # work of another spec or layout cannot be trusted
            if not p.name.startswith("lock"):
                p.unlink()
        io.write_atomic(spec_path, json.dumps(self.fields, sort_keys=True, indent=1))
        offsets = self._make_store(layout, attrs)
        io.write_atomic(layout_path, json.dumps({"splits": shapes, "offsets": offsets}))

    def _make_store(self, layout: dict[str, SplitLayout], attrs: dict) -> dict[str, int | None]:
        """Make the temporary store at its full size; returns each dataset's byte offset."""
        dtype = storage_dtype(self.fields)
        # Checked first: HDF5 is not to meet a full disk (a crash is possible when its own
        # writes fail). The rows, the attributes, and HDF5's own metadata (measured: about
        # 1 KiB a dataset and 4 KiB a group).
        rows = sum(
            s.rows * (s.id_bytes + 8 + sum(np.prod(a, dtype=int) for a in s.arrays.values())
                      * np.dtype(dtype).itemsize)
            for s in layout.values()
        )  # fmt: skip
        attributes = len(json.dumps([self.fields, attrs])) + len(RUN_ATTRS) * _RUN_ATTR_BYTES
        metadata = 2**13 + sum(2**12 + 2**10 * (2 + len(s.arrays)) for s in layout.values())
        need = rows + attributes + metadata
        free = shutil.disk_usage(self.parts).free
        if need > free:
            raise io.disk_full(
                f"store {self.out}",
                f" (it needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} free)",
                kept="",
            )
        tmp = self.parts / f".store.h5.tmp-{os.getpid()}"
        offsets = {}
        with io.cleanup_on_failure(tmp, f"store {self.out}", kept=""):
            with h5py.File(tmp, "w", libver="earliest") as f:
                for split, s in layout.items():
                    g = f.create_group(split)
                    datasets = {
                        "ids": ((s.rows,), f"S{max(1, s.id_bytes)}"),
                        "labels": ((s.rows,), "<i8"),
                        **{k: ((s.rows, *shape), dtype) for k, shape in s.arrays.items()},
                    }
                    for name, (shape, dt) in datasets.items():
                        offsets[f"{split}/{name}"] = _allocated(g, name, shape, dt)
                f.attrs["format"] = FORMAT
                f.attrs["featcache_version"] = __version__
                f.attrs["fingerprint"] = self.fp
                f.attrs["fields"] = json.dumps(self.fields, sort_keys=True)
                for key, value in attrs.items():
                    f.attrs[key] = json.dumps(value, sort_keys=True)
                for key in RUN_ATTRS:  # overwritten in place when the run ends
                    f.attrs.create(key, np.array(b"{}", dtype=f"S{_RUN_ATTR_BYTES}"))
            _reserve(tmp)
            io.commit(tmp, self.temp)
        return offsets

    def _take_lock(self, path: Path) -> None:
        busy = StoreError(
            f"another featcache extraction is writing {self.out} right now; wait for it "
            "or choose another --out"
        )
        if path in _HELD:  # POSIX locks do not exclude the process that holds them
            raise busy
        self._lock = open(path, "w")  # noqa: SIM115 - held for the run
        try:
            # A POSIX record lock, not flock: it belongs to this process alone, so it dies
            # with it, where a flock would live on in forked loader workers (seconds after
            # a kill -9, refusing the immediate rerun).
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise busy from None
            raise
        _HELD.add(path)
        self._lock_path = path

    # -- shards ---------------------------------------------------------------------------

    def journal_path(self, split: str, index: int) -> Path:
        return self.parts / f"{split}-{index:06d}.done"

    def _entry(self, split: str, index: int) -> dict | None:
        path = self.journal_path(split, index)
        return json.loads(path.read_text()) if path.exists() else None

    def has_shard(self, split: str, index: int, rows: range) -> bool:
        """Whether shard ``index`` of ``split`` (``rows`` of it) is written and journalled."""
        entry = self._entry(split, index)
        return entry is not None and (entry["start"], entry["stop"]) == (rows.start, rows.stop)

    def write_shard(
        self, split: str, index: int, start: int, ids, labels, arrays: dict, skipped, seconds
    ) -> None:
        """Write rows ``start:start + len(ids)`` of a split, fsync them, then journal them.

        ``skipped``: (row, id) of unreadable images among these rows (their rows hold zeros
        and are left out when the store is published)."""
        dtype = storage_dtype(self.fields)
        n = len(ids)
        id_dtype = f"S{max(1, self.layout['splits'][split]['id_bytes'])}"
        columns = {
            "ids": np.asarray([i.encode() for i in ids], dtype=id_dtype),
            "labels": np.asarray(labels, dtype="<i8"),
            **{k: np.ascontiguousarray(v, dtype=dtype) for k, v in arrays.items()},
        }  # fmt: skip
        path = self.journal_path(split, index)
        try:
            for name, data in columns.items():
                if len(data) != n:
                    raise ValueError(f"{name}: {len(data)} rows for {n} ids")
                offset = self.layout["offsets"][f"{split}/{name}"]
                if offset is not None and n:
                    row_bytes = data.nbytes // n
                    _pwrite_all(self._fd, memoryview(data).cast("B"), offset + start * row_bytes)
            os.fsync(self._fd)
        except OSError as exc:
            if io.is_disk_full(exc):
                raise io.disk_full(f"shard {path.name} of {self.out}") from exc
            raise
        entry = {"start": start, "stop": start + n, "skipped": skipped, "seconds": seconds}
        io.write_atomic(path, json.dumps(entry), kept=io.SHARDS_KEPT)

    # -- publishing -----------------------------------------------------------------------

    def assemble(self, shards: dict[str, list[range]], meta: dict) -> Path:
        """Publish the store once every shard (``shards``: split -> rows of each) is in:
        ``meta`` (``config``, ``extraction``) written into its reserved attributes, then the
        file renamed into place (copied once, without the skipped rows, where any were)."""
        missing = [
            self.journal_path(split, i).name
            for split, ranges in shards.items()
            for i, rows in enumerate(ranges)
            if not self.has_shard(split, i, rows)
        ]
        if missing:
            raise StoreError(
                f"cannot assemble {self.out}: {len(missing)} shards missing (e.g. {missing[:3]}); "
                "rerun the same command to extract them"
            )
        entries = {s: [self._entry(s, i) for i in range(len(r))] for s, r in shards.items()}
        skipped = {s: [row for e in es for row in e["skipped"]] for s, es in entries.items()}
        seconds = sum(e["seconds"] for es in entries.values() for e in es)
        meta = {**meta, "extraction": {**meta.get("extraction", {}), "seconds": seconds}}
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._write_run_attrs(meta)
        if any(skipped.values()):
            self._publish_without(skipped, meta)
        else:
            try:
                io.commit(self.temp, self.out)  # fsync, rename: the store appears whole
            except OSError as exc:
                if io.is_disk_full(exc):
                    raise io.disk_full(f"store {self.out}") from exc
                raise
        self.close()
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.out

    def _write_run_attrs(self, meta: dict) -> None:
        """The run's attributes, overwritten in place: same type and size, so HDF5 rewrites
        their bytes and nothing else (a kill meanwhile leaves the rerun to write them again)."""
        with h5py.File(self.temp, "r+") as f:
            for key in RUN_ATTRS:
                text = json.dumps(meta.get(key, {}), sort_keys=True).encode()
                if len(text) > _RUN_ATTR_BYTES:
                    raise StoreError(f"the store's {key} attribute is over {_RUN_ATTR_BYTES} bytes")
                f.attrs.modify(key, np.array(text, dtype=f"S{_RUN_ATTR_BYTES}"))

    def _publish_without(self, skipped: dict[str, list], meta: dict) -> None:
        """Copy the store without the rows of skipped images, a split at a time."""
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed publication; we hold the lock
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        with io.cleanup_on_failure(tmp, f"store {self.out}"):
            with h5py.File(self.temp, "r") as src, h5py.File(tmp, "w") as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                for split in src:
                    _copy_split(src[split], dst.create_group(split), skipped.get(split, []))
            io.commit(tmp, self.out)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        lock = getattr(self, "_lock", None)
        if lock is not None and not lock.closed:
            _HELD.discard(self._lock_path)
            lock.close()  # releases the lock


def _allocated(group: h5py.Group, name: str, shape: tuple, dtype: str) -> int | None:
    """A contiguous dataset whose space is allocated now and never filled (its rows are
    written later with pwrite); its byte offset in the file (None when it holds no bytes)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    if "/" in name:
        parent, name = name.rsplit("/", 1)
        group = group.require_group(parent)
    space = h5py.h5s.create_simple(shape)
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
    ds = h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
    if np.prod(shape) == 0:
        return None  # no bytes: nothing is ever written there
    offset = ds.get_offset()
    if offset is None:  # never: its space was allocated now
        raise StoreError(f"HDF5 allocated no space for {name} {shape}; report this as a bug")
    return int(offset)


def _reserve(path: Path) -> None:
    """Allocate the file's blocks now (it is sparse), so that a full disk is met here, before
    any work, and never by a shard's write."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without it
            raise
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _copy_split(src: h5py.Group, dst: h5py.Group, skipped: list) -> None:
    keep = np.ones(len(src["ids"]), bool)
    keep[[row for row, _ in skipped]] = False
    for name in ("ids", "labels", *(f"{g}/{k}" for g in ("features", "views") if g in src
                                    for k in src[g])):  # fmt: skip
        data = src[name]
        out = dst.create_dataset(name, shape=(int(keep.sum()), *data.shape[1:]), dtype=data.dtype)
        row_bytes = max(1, data.dtype.itemsize * int(np.prod(data.shape[1:])))
        rows, start = max(1, 2**27 // row_bytes), 0  # 128 MiB of rows in memory at a time
        for lo in range(0, len(data), rows):
            chunk = data[lo : lo + rows][keep[lo : lo + rows]]
            out[start : start + len(chunk)] = chunk
            start += len(chunk)
    if skipped:
        ids = np.asarray(sorted(i for _, i in skipped), dtype=object)
        dst.create_dataset("skipped", data=ids, dtype=h5py.string_dtype())

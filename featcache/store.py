"""The HDF5 feature store: fingerprinted, written as shards, assembled atomically.

Layout of a finished store (plain h5py/h5ls can read it)::

    /                     attrs: format, featcache_version, fingerprint, fields (JSON),
                                 class_names (JSON), config (JSON), extraction (JSON),
                                 backbone_spec (JSON: the registry entry it was made with)
    /<split>/ids          (N,) str     stable sample ids
    /<split>/labels       (N,) int64
    /<split>/features/<name>  (N, D) float32 (float16 with extract --dtype float16)
    /<split>/skipped      (M,) str     unreadable images skipped with --skip-bad (if any)

While extracting, finished work lives in ``<store>.parts/`` as shard files, each written to a
temporary name, fsynced and renamed, so a shard that exists is complete. The store itself is
assembled into a temporary file and renamed into place: a reader never sees half a store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache import __version__
from featcache.errors import SpecMismatchError, StoreError

FORMAT = "featcache-store/1"

_STR = h5py.string_dtype()
# Lock files this process holds (POSIX locks do not exclude their own process).
_HELD: set[Path] = set()


def fingerprint(fields: dict) -> str:
    """sha256 of the canonical JSON of everything that shaped the features.

    The fields carry the version of the code that made the features (``feature_version``,
    extract.FEATURE_VERSION), so that bumping it refuses older stores and shards.
    """
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _versioned(fields: dict) -> dict:
    """Fields recorded before they carried their feature version are version 1 (the hash
    added it then: their recorded fingerprint is the same)."""
    return fields if "feature_version" in fields else {**fields, "feature_version": 1}


def first_difference(stored: dict, wanted: dict) -> str | None:
    """The first field (in the requested order) whose value differs, for an error message."""
    for key in [*wanted, *(k for k in stored if k not in wanted)]:
        a, b = stored.get(key), wanted.get(key)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            return f"field '{key}' differs: existing {json.dumps(a)} vs requested {json.dumps(b)}"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file and rename it into place atomically."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


_SHARDS_KEPT = "; the shards finished so far are kept and will not be redone"


def _disk_full(what: str, detail: str = "", kept: str = _SHARDS_KEPT) -> StoreError:
    return StoreError(
        f"disk full while writing the {what}{detail}: free some space and rerun the same "
        f"command{kept}"
    )


@contextlib.contextmanager
def _cleanup_on_failure(tmp: Path, what: str, kept: str = _SHARDS_KEPT):
    """Remove a half-written temporary file; a full disk becomes a clear error."""
    try:
        yield
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left" in str(exc)):
            raise _disk_full(what, kept=kept) from exc
        raise


def write_atomic(path: str | Path, data: str | bytes, kept: str = "") -> None:
    """Write a file whole or not at all (shards, specs, results, reports): a temporary file of
    its own beside it (two writers never share one), fsynced, then renamed over ``path``.

    A full disk is a StoreError; ``kept`` ends its message (what the failure did not lose).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise StoreError(f"{path}: directory {path.parent} does not exist")
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    with _cleanup_on_failure(tmp, f"file {path}", kept=kept):
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        _commit(tmp, path)


def _hdf5_image(fill) -> memoryview:
    """An HDF5 file made in memory by ``fill(file)``, as bytes.

    HDF5 is never the one to meet a full disk: when its own writes fail it prints errors
    from deallocators and can crash the process (seen: a segfault on a full tmpfs). Plain
    Python writes the bytes instead, and ENOSPC is then an ordinary OSError.
    """
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    return buf.getbuffer()  # no copy


# How features may be stored: float32, or float16 for half the disk and memory (readers
# compute in float32).
DTYPES = ("float32", "float16")


def storage_dtype(fields: dict) -> str:
    """The features' dtype in a store of these fingerprint fields (absent: float32)."""
    return fields.get("dtype", "float32")


_READ_VALUES = 2**22  # float16 values read at once by as_float32


def as_float32(dataset: h5py.Dataset, rows: slice = slice(None)) -> np.ndarray:
    """Rows of a feature dataset as float32. A float16 store is read into the float32 array
    4M values at a time, never held whole in its stored dtype too (1.5x the memory); faster
    than one read and a conversion, and than HDF5's own conversion."""
    if dataset.dtype == np.float32:
        return dataset[rows]
    start, stop, _ = rows.indices(len(dataset))
    out = np.empty((max(0, stop - start), *dataset.shape[1:]), np.float32)
    step = max(1, _READ_VALUES // max(1, math.prod(dataset.shape[1:])))
    for i in range(start, stop, step):
        out[i - start : min(i + step, stop) - start] = dataset[i : min(i + step, stop)]
    return out


def _write_split(group: h5py.Group, ids, labels, arrays: dict, skipped, dtype: str) -> None:
    """arrays: per-sample float arrays keyed by path, e.g. ``features/cls`` or ``views/cls``."""
    group.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=_STR)
    group.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    for name, arr in arrays.items():
        group.create_dataset(name, data=np.asarray(arr, dtype=dtype))
    if len(skipped):
        group.create_dataset("skipped", data=np.asarray(skipped, dtype=object), dtype=_STR)


class ShardedWriter:
    """Writes shards of one extraction and assembles them into the final store.

    Creating it only checks the target, touching nothing: a finished store, or partial work
    with another fingerprint, is refused (naming the differing field) unless ``overwrite``; a
    finished store with the same fingerprint sets ``complete``. ``begin()`` then takes an
    exclusive lock on the work folder, so two extractions into one store cannot interleave.
    The lock dies with the process that took it (not with its forked loader workers).
    """

    def __init__(self, out: Path, fields: dict, overwrite: bool = False):
        self.out = Path(out)
        self.fields = _versioned(fields)
        self.fp = fingerprint(self.fields)
        self.overwrite = overwrite
        self.parts = self.out.with_name(self.out.name + ".parts")
        if not self.out.parent.is_dir():
            raise StoreError(
                f"--out {self.out}: directory {self.out.parent} does not exist; create it first"
            )
        self.complete = False
        if self.out.exists():
            recorded, stored = _stored_spec(self.out)
            if recorded == self.fp:
                self.complete = True
                return
            if not overwrite:
                why = first_difference(stored, fields) if stored else "it is not a featcache store"
                raise SpecMismatchError(
                    f"{self.out} already exists with another spec ({why}); choose another --out "
                    "or pass --overwrite to replace it"
                )
        self._check_partial()

    def _check_partial(self) -> None:
        """Refuse partial work of another spec unless overwrite (``begin`` then clears it)."""
        spec_path = self.parts / "spec.json"
        if not spec_path.exists() or not any(self.parts.glob("*.h5")):
            return
        stored = _versioned(json.loads(spec_path.read_text()))
        if fingerprint(stored) != self.fp and not self.overwrite:
            raise SpecMismatchError(
                f"{self.parts} holds a partial extraction with another spec "
                f"({first_difference(stored, self.fields)}); rerun the original command to "
                "finish it, or pass --overwrite to discard it"
            )

    def begin(self, rank: int = 0) -> None:
        """Lock the work folder and record the spec; shards already there are kept.

        Under torchrun every rank holds a lock of its own; rank 0 records the spec, and the
        other ranks begin only after it (a barrier in the caller).
        """
        self.parts.mkdir(exist_ok=True)
        path = (self.parts / ("lock" if rank == 0 else f"lock.{rank}")).resolve()
        self._take_lock(path)
        if rank != 0:
            return
        try:
            self._check_partial()  # checked again under the lock
            spec_path = self.parts / "spec.json"
            recorded = spec_path.exists() and _versioned(json.loads(spec_path.read_text()))
            if not recorded or fingerprint(recorded) != self.fp:
                self._clear_shards()  # shards of an unrecorded spec cannot be trusted
                write_atomic(spec_path, json.dumps(self.fields, sort_keys=True, indent=1))
        except BaseException:
            self.close()  # the lock too: a failed begin must not keep the store busy
            raise

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

    def _clear_shards(self) -> None:
        for p in self.parts.iterdir():
            if not p.name.startswith("lock"):
                p.unlink()

    def shard_path(self, split: str, index: int) -> Path:
        return self.parts / f"{split}-{index:06d}.h5"

    def has_shard(self, split: str, index: int) -> bool:
        return self.shard_path(split, index).exists()

    def write_shard(
        self, split: str, index: int, ids, labels, arrays: dict, skipped, seconds: float
    ) -> None:
        def fill(f: h5py.File) -> None:
            _write_split(f, ids, labels, arrays, skipped, storage_dtype(self.fields))
            f.attrs["seconds"] = seconds

        write_atomic(self.shard_path(split, index), _hdf5_image(fill), kept=_SHARDS_KEPT)

    def assemble(self, splits: dict[str, int], meta: dict) -> Path:
        """Concatenate the shards of each split (``splits``: name -> shard count) into the store."""
        missing = [
            self.shard_path(split, i).name
            for split, n in splits.items()
            for i in range(n)
            if not self.has_shard(split, i)
        ]
        if missing:
            raise StoreError(
                f"cannot assemble {self.out}: {len(missing)} shards missing (e.g. {missing[:3]}); "
                "rerun the same command to extract them"
            )
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed assembly; we hold the lock
        # The store is about as large as its shards. Checked first, as HDF5 is not to meet a
        # full disk (_hdf5_image); space taken by others meanwhile can still crash it, which
        # loses nothing: the shards stay, and the rerun assembles again.
        shards = sum(
            self.shard_path(split, i).stat().st_size
            for split, n in splits.items()
            for i in range(n)
        )
        need = int(shards * 1.05) + 2**20  # with its attributes: the config, the fields, ...
        free = shutil.disk_usage(self.out.parent).free
        if need > free:
            raise _disk_full(
                f"store {self.out}",
                f" (it needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} free)",
            )
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        seconds = 0.0
        with _cleanup_on_failure(tmp, f"store {self.out}"):
            with h5py.File(tmp, "w") as f:
                for split, n_shards in splits.items():
                    parts = [self.shard_path(split, i) for i in range(n_shards)]
                    dtype = storage_dtype(self.fields)
                    seconds += self._concat(f.create_group(split), parts, dtype)
                f.attrs["format"] = FORMAT
                f.attrs["featcache_version"] = __version__
                f.attrs["fingerprint"] = self.fp
                f.attrs["fields"] = json.dumps(self.fields, sort_keys=True)
                meta = {**meta, "extraction": {**meta.get("extraction", {}), "seconds": seconds}}
                for key, value in meta.items():
                    f.attrs[key] = json.dumps(value, sort_keys=True)
            _commit(tmp, self.out)
        self.close()
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.out

    @staticmethod
    def _concat(group: h5py.Group, parts: list[Path], dtype: str) -> float:
        sizes, seconds, skipped, shapes = [], 0.0, [], {}
        for p in parts:
            with h5py.File(p, "r") as s:
                sizes.append(len(s["ids"]))
                seconds += float(s.attrs["seconds"])
                if "skipped" in s:
                    skipped += [x.decode() for x in s["skipped"][:]]
                for g in ("features", "views"):
                    if g in s:
                        shapes |= {f"{g}/{k}": v.shape[1:] for k, v in s[g].items()}
        n = sum(sizes)
        ids = group.create_dataset("ids", shape=(n,), dtype=_STR)
        labels = group.create_dataset("labels", shape=(n,), dtype=np.int64)
        arrays = {
            k: group.create_dataset(k, shape=(n, *shape), dtype=dtype)
            for k, shape in shapes.items()
        }
        start = 0
        for p, size in zip(parts, sizes):
            with h5py.File(p, "r") as s:  # one shard in memory at a time: memory stays flat
                ids[start : start + size] = s["ids"][:]
                labels[start : start + size] = s["labels"][:]
                for k, d in arrays.items():
                    d[start : start + size] = s[k][:]
            start += size
        if skipped:
            group.create_dataset("skipped", data=np.asarray(skipped, dtype=object), dtype=_STR)
        return seconds

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None and not lock.closed:
            _HELD.discard(self._lock_path)
            lock.close()  # releases the lock


def _stored_spec(path: Path) -> tuple[str | None, dict | None]:
    """(recorded fingerprint, fields) of a finished store; (None, None) if it is none."""
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs["fingerprint"]), _versioned(json.loads(f.attrs["fields"]))
    except (OSError, KeyError, ValueError):
        return None, None


def _refuse_foreign_data(f: h5py.File, path: Path) -> None:
    """A store holds its own data only: no links to other files, no virtual or external data."""
    problems = []

    def visit(name: str, link) -> None:
        if isinstance(link, h5py.ExternalLink):
            problems.append(f"'{name}' is an external link to {link.filename}")
        elif isinstance(link, h5py.SoftLink):
            problems.append(f"'{name}' is a soft link to {link.path}")
        elif isinstance(link, h5py.HardLink):
            obj = f[name]
            if isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.external):
                problems.append(f"'{name}' is a virtual or external-storage dataset")

    f.visititems_links(visit)
    if problems:
        raise StoreError(
            f"{path} refers to data outside itself ({'; '.join(problems[:3])}); featcache "
            "stores never do, so this file is refused"
        )


def parse_size(text: str) -> int:
    """Bytes of a size such as ``2GiB``, ``512MiB``, ``1.5GB`` or ``1000000``."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
    number = text.strip().lower().rstrip("bikmgt")
    unit = text.strip().lower()[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(
            f"cannot read {text!r} as a size; write e.g. 2GiB, 512MiB or 1e9"
        ) from None
    if value < 1:
        raise ValueError(f"size {text!r} is less than one byte")
    return int(value)


def result_path(store: str | Path, kind: str) -> Path:
    """Where a result computed from a store is kept beside it: ``S.probe.json`` for ``S.h5``."""
    store = Path(store)
    return store.with_name(f"{store.stem}.{kind}.json")


@dataclass
class Split:
    """Features of one split, loaded into memory."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    ids: list[str]


class Features:
    """One split's features: ``x, y, ids = store.features("train")``. ``x`` is read from the
    store on first access, so labels and ids alone cost no feature I/O."""

    def __init__(self, store: Store, split: str, name: str, as_torch: bool):
        self.store, self.split, self.name, self.as_torch = store, split, name, as_torch
        self._x = None
        self.y: np.ndarray = store.read(split, "labels")
        self.ids: list[str] = store.read(split, "ids").tolist()

    @property
    def x(self):
        if self._x is None:
            with h5py.File(self.store.path, "r") as f:
                x = as_float32(f[self.split]["features"][self.name])
            if self.as_torch:
                import torch

                x = torch.from_numpy(x)
            self._x = x
        return self._x

    def __iter__(self):
        return iter((self.x, self.y, self.ids))

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return f"Features({self.store.path.name}, {self.split}, {self.name}, {len(self)} rows)"


class Store:
    """Read access to a finished store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            parts = self.path.with_name(self.path.name + ".parts")
            hint = (
                " (an extraction into it is unfinished: rerun the extract command to finish it)"
                if parts.exists()
                else ""
            )
            raise StoreError(f"store {self.path} does not exist{hint}")
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise StoreError(f"{self.path} is not a featcache store (no format {FORMAT})")
                _refuse_foreign_data(f, self.path)
                self.attrs = {k: f.attrs[k] for k in f.attrs}
                self.splits = {
                    s: sorted(f[s]["features"].keys())
                    for s in f.keys()
                    if isinstance(f[s], h5py.Group) and "features" in f[s]
                }
                self.sizes = {s: len(f[s]["ids"]) for s in self.splits}
        except OSError as exc:
            raise StoreError(f"cannot read store {self.path}: {exc}") from exc
        self.fingerprint: str = self.attrs["fingerprint"]
        self.fields: dict = json.loads(self.attrs["fields"])
        self.class_names: list[str] = json.loads(self.attrs["class_names"])
        self.config: dict = json.loads(self.attrs["config"])
        self.extraction: dict = json.loads(self.attrs.get("extraction", "{}"))
        # The registry entry it was made with, as recorded (stage 2 never asks the registry).
        self.backbone_spec: dict = json.loads(self.attrs.get("backbone_spec", "{}"))

    def default_feature(self) -> str:
        return self.fields["backbone"]["default_feature"]

    @property
    def feature_sets(self) -> list[str]:
        """The feature sets every split holds (``cls``, ``patch_mean``, ...)."""
        sets = [set(f) for f in self.splits.values()]
        return sorted(set.intersection(*sets)) if sets else []

    def features(self, split: str, name: str | None = None, torch: bool = False) -> Features:
        """One split's features as a record that unpacks as ``x, y, ids``; ``x`` (N, D)
        float32 is read on first use (as a torch tensor with ``torch=True``)."""
        name = name or self.default_feature()
        self.check(split, name)
        return Features(self, split, name, torch)

    def info(self) -> dict:
        """The store's metadata, as ``featcache info --json`` prints it."""
        plain = ("format", "fingerprint", "featcache_version")
        meta = {k: (v if k in plain else json.loads(v)) for k, v in self.attrs.items()}
        return {**meta, "splits": self.splits, "sizes": self.sizes}

    def check(self, split: str, feature: str | None = None) -> None:
        if split not in self.splits:
            raise StoreError(
                f"store {self.path} has no '{split}' split (it has: {sorted(self.splits)}); "
                f"extract it with --splits {split}"
            )
        if feature is not None and feature not in self.splits[split]:
            raise StoreError(
                f"store {self.path} has no feature set '{feature}' in '{split}' "
                f"(it has: {self.splits[split]}); pass --features with one of them"
            )

    def load(self, split: str, feature: str) -> Split:
        self.check(split, feature)
        with h5py.File(self.path, "r") as f:
            g = f[split]
            return Split(
                features=as_float32(g["features"][feature]),
                labels=g["labels"][:],
                ids=[x.decode() for x in g["ids"][:]],
            )

    def rows(self, split: str, feature: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a split's features, as float32: a chunk of a store that need
        not fit in memory."""
        with h5py.File(self.path, "r") as f:
            return as_float32(f[split]["features"][feature], slice(start, stop))

    def read(self, split: str, name: str) -> np.ndarray:
        """One small per-sample dataset of a split (``labels`` or ``ids``) without features."""
        self.check(split)
        with h5py.File(self.path, "r") as f:
            data = f[split][name][:]
        return np.array([x.decode() for x in data]) if data.dtype == object else data

    def load_views(self, split: str, feature: str) -> np.ndarray | None:
        """Augmented views (N, K-1, D) of a split's images, or None if none were extracted."""
        self.check(split, feature)
        with h5py.File(self.path, "r") as f:
            g = f[split]
            return as_float32(g["views"][feature]) if "views" in g else None

    @property
    def num_views(self) -> int:
        """Views per training image, the clean one included (1: no augmented views)."""
        return int((self.fields.get("views") or {}).get("count", 1))

    def pair_feature(self, feature: str | None, train: str = "train", test: str = "test") -> str:
        """The feature set to read (default: the backbone's first), checked in both splits."""
        feature = feature or self.default_feature()
        self.check(train, feature)
        self.check(test, feature)
        return feature

    def load_pair(self, feature: str | None, train: str = "train", test: str = "test"):
        """(feature name, train Split, test Split), checking both exist first."""
        feature = self.pair_feature(feature, train, test)
        return feature, self.load(train, feature), self.load(test, feature)

    def provenance(self, kind: str, feature: str, config) -> dict:
        """The header of every result computed from this store (probe, k-NN, ...); ``config``
        (a method's config dataclass) is recorded as JSON."""
        return {
            "kind": kind,
            "store": str(self.path),
            "fingerprint": self.fingerprint,
            "backbone": self.fields["backbone"]["name"],
            "features": feature,
            "class_names": self.class_names,
            "config": json.loads(json.dumps(asdict(config))),  # tuples as lists
            "featcache_version": __version__,
        }

    def skipped(self, split: str) -> list[str]:
        with h5py.File(self.path, "r") as f:
            g = f[split]
            return [x.decode() for x in g["skipped"][:]] if "skipped" in g else []

    def describe(self) -> str:
        b = self.fields["backbone"]
        lines = [
            f"store        {self.path}",
            f"format       {self.attrs['format']} (featcache {self.attrs['featcache_version']})",
            f"fingerprint  {self.fingerprint}",
            f"backbone     {b['name']} (weights {self.fields['weights']})",
            f"dataset      {self.config['dataset']}  subset {self.fields['subset']}",
            f"precision    {self.fields['precision']}  device {self.extraction.get('device')}",
            f"classes      {len(self.class_names)}: {', '.join(self.class_names)}",
        ]
        for s, feats in self.splits.items():
            lines.append(f"split {s:6s} {self.sizes[s]} samples; features: {', '.join(feats)}")
        if self.extraction.get("seconds"):
            lines.append(f"extraction   {self.extraction['seconds']:.1f} s of compute")
        return "\n".join(lines)

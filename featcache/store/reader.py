"""Reading a finished store: its metadata at once, features only when asked.

Layout of a finished store (plain h5py/h5ls can read it)::

    /                     attrs: format, featcache_version, fingerprint, fields (JSON),
                                 class_names (JSON), config (JSON), extraction (JSON),
                                 backbone_spec (JSON: the registry entry it was made with)
    /<split>/ids          (N,) str     stable sample ids
    /<split>/labels       (N,) int64
    /<split>/features/<name>  (N, D) float32 (float16 with extract --dtype float16)
    /<split>/views/<name>     (N, K-1, D) augmented views (extract --views K)
    /<split>/skipped      (M,) str     unreadable images skipped with --skip-bad (if any)

``store/writer.py`` says how one is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from featcache import __version__
from featcache.errors import StoreError
from featcache.store.format import FORMAT, versioned

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


def _text(data: np.ndarray) -> np.ndarray:
    """Strings of an ids or skipped dataset: variable-length (object) or fixed-length bytes."""
    return np.array([x.decode() for x in data]) if data.dtype.kind in "OS" else data


def stored_spec(path: Path) -> tuple[str | None, dict | None]:
    """(recorded fingerprint, fields) of a finished store; (None, None) if it is none."""
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs["fingerprint"]), versioned(json.loads(f.attrs["fields"]))
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


def attention_path(store: str | Path) -> Path:
    """Where a store's attention maps lie (``featcache attention --store S`` makes them)."""
    store = Path(store)
    return store.with_name(f"{store.stem}.attention.npz")


def open_store(store: str | Path | Store) -> Store:
    """A store given as a path or already open."""
    return store if isinstance(store, Store) else Store(store)


def zeroshot_path(store: str | Path) -> Path:
    """Where a store's zero-shot classifier lies (``featcache zeroshot`` makes it with the
    store's own CLIP text tower; scoring reads it)."""
    store = Path(store)
    return store.with_name(f"{store.stem}.zeroshot.npz")


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
                # Feature sets in the order recorded (the backbone's, then inner layers by
                # depth); by name in stores made before it was.
                rank = {
                    n: k for k, n in enumerate(json.loads(self.attrs.get("feature_order", "[]")))
                }
                self.splits = {
                    s: sorted(f[s]["features"].keys(), key=lambda n: (rank.get(n, len(rank)), n))
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
        common = set.intersection(*sets) if sets else set()
        return [name for name in next(iter(self.splits.values()), []) if name in common]

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

    def rows(
        self, split: str, feature: str, start: int, stop: int, as_stored: bool = False
    ) -> np.ndarray:
        """Rows ``start:stop`` of a split's features, as float32 (or in the stored dtype,
        ``as_stored``): a chunk of a store that need not fit in memory."""
        with h5py.File(self.path, "r") as f:
            data = f[split]["features"][feature]
            return data[start:stop] if as_stored else as_float32(data, slice(start, stop))

    def rows_at(self, split: str, feature: str, positions: np.ndarray) -> np.ndarray:
        """Rows at ``positions`` (any order, no repeats) of a split's features, float64: a
        contiguous run is read as a slice, others by sorted index."""
        with h5py.File(self.path, "r") as f:
            data = f[split]["features"][feature]
            if len(positions) and np.array_equal(
                positions, np.arange(positions[0], positions[0] + len(positions))
            ):
                return data[positions[0] : positions[0] + len(positions)].astype(np.float64)
            order = np.argsort(positions)
            out = np.empty((len(positions), data.shape[1]), np.float64)
            out[order] = data[positions[order]]
            return out

    def read(self, split: str, name: str) -> np.ndarray:
        """One small per-sample dataset of a split (``labels`` or ``ids``) without features."""
        self.check(split)
        with h5py.File(self.path, "r") as f:
            data = f[split][name][:]
        return _text(data)

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

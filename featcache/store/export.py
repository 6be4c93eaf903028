"""Features out of a store, for tools that read numpy or parquet (``featcache export``).

``npy``: ``DIR/<split>/<feature>.npy`` (N, D) per split and feature set, with
``DIR/<split>/ids.txt`` (one id a line) and ``DIR/<split>/labels.npy``, and
``DIR/class_names.txt``. ``parquet``: clip-retrieval's layout, which autofaiss reads:
``DIR/img_emb/img_emb_<k>.npy`` beside ``DIR/metadata/metadata_<k>.parquet`` (columns ``id``,
``label``, ``class_name``, ``split``), row for row, ``shard_size`` rows a file, the splits one
after the other (train, test, then others); several feature sets go to ``DIR/<feature>/``.

Features keep their stored dtype (float16 stays float16) unless ``dtype="float32"``; rows are
copied a chunk at a time (stores larger than memory export too). The files are written into a
temporary folder beside ``out``, renamed into place when whole.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.errors import ArgumentError, OutputError
from featcache.io import check_output
from featcache.store.reader import Store, open_store

FORMATS = ("npy", "parquet")
_CHUNK = 1 << 16  # rows copied at a time


@dataclass(frozen=True)
class ExportConfig:
    format: str = "npy"
    # Feature sets to export; empty: every set (npy) or the store's default set (parquet).
    features: tuple[str, ...] = ()
    # None keeps the stored dtype; "float32" widens float16 features.
    dtype: str | None = None
    # Rows per img_emb / metadata file (parquet layout).
    shard_size: int = 1_000_000
    overwrite: bool = False

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ArgumentError(
                f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}"
            )
        if self.dtype not in (None, "float32"):
            raise ArgumentError(f"--dtype is float32 or left out, got {self.dtype!r}")
        if self.shard_size < 1:
            raise ArgumentError(f"--shard-size must be at least 1, got {self.shard_size}")


def export(store: str | Path | Store, out: str | Path, cfg: ExportConfig = ExportConfig()) -> Path:
    """Write ``store``'s features to the folder ``out`` in ``cfg.format``; returns ``out``."""
    store = open_store(store)
    out = check_output(out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise OutputError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    features = _features(store, cfg)
    if cfg.format == "parquet":
        _parquet_writer()  # refused before any file is written
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if cfg.format == "npy":
            _npy(store, tmp, features, cfg)
        else:
            for name in features:
                _clip_retrieval(store, tmp / name if len(features) > 1 else tmp, name, cfg)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _features(store: Store, cfg: ExportConfig) -> list[str]:
    if not cfg.features:
        return store.feature_sets if cfg.format == "npy" else [store.default_feature()]
    if cfg.features == ("all",):
        return store.feature_sets
    for split in store.splits:
        for name in cfg.features:
            store.check(split, name)
    return list(cfg.features)


def _in_order(splits) -> list[str]:
    """train, then test, then any other split by name."""
    return sorted(splits, key=lambda s: (s != "train", s != "test", s))


def _chunks(store: Store, split: str, feature: str, dtype: str | None):
    """The split's feature rows, ``_CHUNK`` at a time, in the stored dtype or (``dtype``
    given: float32, the only one) as float32."""
    for start in range(0, store.sizes[split], _CHUNK):
        yield store.rows(split, feature, start, start + _CHUNK, as_stored=dtype is None)


def _npy(store: Store, root: Path, features: list[str], cfg: ExportConfig) -> None:
    (root / "class_names.txt").write_text("\n".join(store.class_names) + "\n", encoding="utf-8")
    for split in store.splits:
        folder = root / split
        folder.mkdir()
        ids = store.read(split, "ids")
        (folder / "ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        np.save(folder / "labels.npy", store.read(split, "labels"))
        for name in features:
            first = store.rows(split, name, 0, 1, as_stored=True)
            shape = (store.sizes[split], first.shape[1])
            array = np.lib.format.open_memmap(
                folder / f"{name}.npy", mode="w+", dtype=cfg.dtype or first.dtype, shape=shape
            )
            at = 0
            for rows in _chunks(store, split, name, cfg.dtype):
                array[at : at + len(rows)] = rows
                at += len(rows)
            array.flush()
            del array


def _parquet_writer():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ArgumentError(
            "--format parquet needs pyarrow: pip install 'featcache[parquet]' (or pip install "
            "pyarrow)"
        ) from None
    return pyarrow, pyarrow.parquet


def _clip_retrieval(store: Store, root: Path, feature: str, cfg: ExportConfig) -> None:
    """img_emb/img_emb_<k>.npy and metadata/metadata_<k>.parquet, ``shard_size`` rows each
    (the splits one after the other), written as the rows are read: memory holds a chunk."""
    pa, pq = _parquet_writer()
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    splits = _in_order(store.splits)
    total = sum(store.sizes[s] for s in splits)
    width = store.rows(splits[0], feature, 0, 1, as_stored=True)
    shard, emb, meta, at = -1, None, None, 0  # at: row in the current shard

    def open_shard(k: int):
        rows = min(cfg.shard_size, total - k * cfg.shard_size)
        emb = np.lib.format.open_memmap(
            root / "img_emb" / f"img_emb_{k}.npy", mode="w+",
            dtype=cfg.dtype or width.dtype, shape=(rows, width.shape[1]),
        )  # fmt: skip
        schema = pa.schema([("id", pa.string()), ("label", pa.int64()),
                            ("class_name", pa.string()), ("split", pa.string())])  # fmt: skip
        return emb, pq.ParquetWriter(root / "metadata" / f"metadata_{k}.parquet", schema)

    for split in splits:
        ids, labels = store.read(split, "ids"), store.read(split, "labels")
        done = 0  # rows of this split written
        for rows in _chunks(store, split, feature, cfg.dtype):
            while len(rows):
                if emb is None or at == len(emb):
                    if emb is not None:
                        emb.flush()
                        meta.close()
                    shard, at = shard + 1, 0
                    emb, meta = open_shard(shard)
                take = min(len(rows), len(emb) - at)
                part = slice(done, done + take)
                emb[at : at + take] = rows[:take]
                meta.write_table(pa.table({
                    "id": ids[part].tolist(),
                    "label": labels[part].tolist(),
                    "class_name": [store.class_names[y] for y in labels[part]],
                    "split": [split] * take,
                }))  # fmt: skip
                rows, at, done = rows[take:], at + take, done + take
    if emb is not None:
        emb.flush()
        meta.close()

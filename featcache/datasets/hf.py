"""Hugging Face ``datasets``: ``hfds:NAME[:CONFIG]`` and ``hfds-disk:DIR``.

``hfds:NAME[:CONFIG]`` is ``datasets.load_dataset(NAME, CONFIG)``: a Hub name where a network
is reachable, or a local folder of parquet files as the Hub lays them out
(``train-00000-of-00001.parquet``, ...). ``hfds-disk:DIR`` is a ``save_to_disk`` folder. (The
prefix is ``hfds``, not ``hf``, which names transformers backbones.) The image column defaults
to the dataset's ``Image`` feature, the label column to its ``ClassLabel``, whose names are
the class names; ``--image-column`` and ``--label-column`` choose others (integer or text
labels). Sample ids are ``<split>/<row>``; the identity digests labels and image byte sizes.

Listing reads the label column and the image column's byte lengths (Arrow), never an image;
``Split.load`` reads one row's bytes and decodes them with the guard that files get.
``datasets`` is an optional extra: ``pip install 'featcache[hf]'``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featcache.datasets.split import Split, class_order, numbered_ids, open_image
from featcache.errors import BadImageError, DatasetError


def hf_dataset(
    kind: str,
    source: str,
    wanted: tuple[str, ...],
    image_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, Split]:
    """The splits among ``wanted`` of ``hfds:SOURCE`` or ``hfds-disk:SOURCE``."""
    found = _open(kind, source)
    splits, classes = {}, None  # the first split's classes are every split's, as csv: lists
    for name in (n for n in wanted if n in found):
        ds = found[name]
        image = image_column or _column_of(ds, "Image", "--image-column", f"{kind}:{source}")
        label = label_column or _column_of(ds, "ClassLabel", "--label-column", f"{kind}:{source}")
        for column in (image, label):
            if column not in ds.column_names:
                raise DatasetError(
                    f"{kind}:{source} [{name}] has no column {column!r} (it has {ds.column_names})"
                )
        splits[name] = _split(name, ds, image, label, f"{kind}:{source}", classes)
        classes = splits[name].class_names
    return splits


def _open(kind: str, source: str) -> dict[str, Any]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{kind}: needs the Hugging Face datasets library: pip install 'featcache[hf]' "
            "(or pip install datasets)"
        ) from None
    if not source:
        raise DatasetError(f"{kind}: needs a name or folder, e.g. {kind}:cifar10")
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        if kind == "hfds-disk":
            if not Path(source).expanduser().is_dir():
                raise DatasetError(f"hfds-disk:{source}: no such folder (a save_to_disk folder)")
            found = datasets.load_from_disk(str(Path(source).expanduser()))
        else:
            name, _, config = source.partition(":")
            found = datasets.load_dataset(name, config or None)
    except DatasetError:
        raise
    except Exception as exc:  # datasets raises many types: connection, file, format
        raise DatasetError(
            f"{kind}:{source}: cannot load it ({type(exc).__name__}: {str(exc)[:300]}); "
            "without a network give a save_to_disk folder (hfds-disk:DIR) or a folder of "
            "parquet files (hfds:DIR)"
        ) from exc
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()
    if isinstance(found, datasets.Dataset):  # one split saved alone
        return {"train": found}
    return dict(found)


def _column_of(ds, feature: str, option: str, source: str) -> str:
    columns = [k for k, v in ds.features.items() if type(v).__name__ == feature]
    if not columns:
        raise DatasetError(
            f"{source} has no {feature} column (its columns: {dict(ds.features)}); "
            f"name one with {option}"
        )
    return columns[0]


def _split(name: str, ds, image: str, label: str, source: str, classes=None) -> Split:
    """One split; ``classes``: those of the first split, for labels that are not a
    ClassLabel (numbers or text), so that a label means one class in every split."""
    import pyarrow.compute as pc

    if getattr(ds, "_indices", None) is not None:  # select/filter/shuffle: rows by a mapping
        ds = ds.flatten_indices()  # so that its Arrow table is its rows, in order
    feature = ds.features[label]
    column = ds.data.column(label)
    if column.null_count:
        raise DatasetError(
            f"{source} [{name}]: {column.null_count} rows have no label in {label!r}; "
            "extract labelled splits (e.g. --splits train,test=validation)"
        )
    labels = np.asarray(column.to_numpy(zero_copy_only=False))
    if type(feature).__name__ == "ClassLabel":
        classes = list(feature.names)
    elif labels.dtype.kind in "iu":
        classes = classes or [str(c) for c in range(int(labels.max(initial=-1)) + 1)]
    else:  # text labels: classes in csv: lists' order
        text = [str(v) for v in labels]
        classes = classes or class_order(text)
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise DatasetError(
                f"{source} [{name}]: labels {unknown[:5]} of {label!r} are not among the first "
                f"split's classes {classes[:10]}"
            )
        labels = np.asarray([index[c] for c in text])
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DatasetError(
            f"{source} [{name}]: labels of {label!r} run {labels.min()}..{labels.max()}, "
            f"outside its {len(classes)} classes (unlabelled rows are -1: extract labelled "
            "splits, e.g. --splits train,test=validation)"
        )
    column = ds.data.column(image)
    if not hasattr(column.type, "get_field_index") or column.type.get_field_index("bytes") < 0:
        raise DatasetError(
            f"{source} [{name}]: column {image!r} holds no images; pass --image-column"
        )
    lengths = pc.binary_length(pc.struct_field(column, "bytes")).to_pylist()
    paths = pc.struct_field(column, "path").to_pylist()
    # An image kept as a file (no bytes in the table): the file's size, as folders have.
    sizes = [n if n is not None else _file_size(p) for n, p in zip(lengths, paths)]
    rows = _Rows(ds.select_columns([image]), image, source)
    return Split(
        name=name,
        class_names=classes,
        ids=numbered_ids(name, len(ds), width=len(str(max(len(ds) - 1, 0)))),
        labels=labels,
        sizes=sizes,
        where=list(range(len(ds))),
        reader=rows,
    )


def _file_size(path: str | None) -> int:
    try:
        return os.stat(path).st_size if path else -1
    except OSError:
        return -1


@dataclass
class _Rows:
    """Reads the image bytes of a row (or the file an image column names) and decodes them."""

    ds: Any
    column: str
    source: str

    def __post_init__(self):
        from datasets import Image as ImageFeature

        self.ds = self.ds.cast_column(self.column, ImageFeature(decode=False))

    def __call__(self, row: int) -> Image.Image:
        entry = self.ds[row][self.column]
        name = f"{self.source} row {row}"
        if entry.get("bytes") is not None:
            return open_image(entry["bytes"], name)
        if entry.get("path") and os.path.isfile(entry["path"]):
            return open_image(Path(entry["path"]))
        raise BadImageError(name, f"no bytes and no file {entry.get('path')!r}")

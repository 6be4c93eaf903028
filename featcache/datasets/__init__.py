"""Datasets: labelled images with stable ids, split by split, and class-balanced subsets.

Specs (``featcache datasets`` lists them):
    ``cifar10``, ``cifar100``, ``stl10``, ``svhn``, ``mnist``, ``fashion-mnist``,
    ``flowers102``, ``pets``, ``dtd``, ``food101``
                         the field's standard datasets in torchvision's layout under
                         ``--data-root`` (default ``data/``), downloaded where a network is
                         reachable (``standard``).
    ``imagefolder:DIR``  ``DIR/<split>/<class>/<image>`` (``folders``).
    ``csv:FILE``         ``path,label,split`` rows, or ``csv:TRAIN.csv,TEST.csv`` (``folders``).
    ``wds:DIR``          webdataset tar shards in CLIP_benchmark's layout, or a brace pattern
                         (``wds:shards/train-{000..009}.tar``) (``tars``).
    ``hfds:NAME[:CONFIG]``, ``hfds-disk:DIR``
                         Hugging Face ``datasets``: by name or parquet folder, or a
                         ``save_to_disk`` folder (``hf``).

No image is decoded while listing; ``Split.load(i)`` decodes one.
"""

from __future__ import annotations

from pathlib import Path

from featcache.datasets.folders import csv_dataset, imagefolder
from featcache.datasets.split import (
    IMAGE_EXTENSIONS,
    SPLITS,
    Split,
    balanced_subset,
    open_image,
)
from featcache.datasets.standard import DATASETS, load_standard
from featcache.datasets.tars import webdataset
from featcache.errors import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "Split",
    "balanced_subset",
    "dataset_identity",
    "describe",
    "load_dataset",
    "open_image",
]


def load_dataset(
    spec: str,
    data_root: str | Path | None = None,
    splits: tuple[str, ...] = SPLITS,
    image_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, Split]:
    """Parse a dataset spec and list the asked splits that it has (no image is decoded).
    ``image_column`` and ``label_column`` choose a Hugging Face dataset's columns."""
    if spec in DATASETS:
        found = load_standard(spec, Path(data_root).expanduser() if data_root else Path("data"))
        return {name: s for name, s in found.items() if name in splits}
    kind, _, arg = spec.partition(":")
    if kind in ("imagefolder", "csv") and not arg:
        example = "imagefolder:path/to/images" if kind == "imagefolder" else "csv:list.csv"
        raise DatasetError(f"{kind}: needs a path, e.g. {example}")
    if kind == "imagefolder":
        return imagefolder(Path(arg).expanduser(), splits)
    if kind == "csv":
        return csv_dataset(arg, splits)
    if kind == "wds":
        return webdataset(arg, splits)
    if kind in ("hfds", "hfds-disk"):
        from featcache.datasets.hf import hf_dataset

        return hf_dataset(kind, arg, splits, image_column, label_column)
    raise DatasetError(
        f"unknown dataset {spec!r}; use one of {', '.join(DATASETS)}, 'imagefolder:DIR' "
        "(DIR holds train/ and test/, each with one folder per class), 'csv:FILE', "
        "'wds:DIR' (webdataset shards) or 'hfds:NAME' (Hugging Face datasets; hf: names "
        "backbones) (see `featcache datasets`)"
    )


def dataset_identity(spec: str) -> str:
    """The kind of data a spec names, independently of where it lies on disk."""
    return spec if spec in DATASETS else spec.partition(":")[0]


def describe() -> str:
    """The datasets and the two folder forms, for `featcache datasets`."""
    rows = [f"{d.name:14s} {d.description}" for d in DATASETS.values()]
    rows += [
        "",
        "under --data-root (default data/) in torchvision's layout; downloaded when missing",
        "where a network is reachable, else the error says which files to put where.",
        "",
        "imagefolder:DIR   DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg",
        "csv:FILE          rows 'path,label,split' (paths relative to FILE's folder);",
        "                  or csv:TRAIN.csv,TEST.csv with rows 'path,label'",
        "wds:DIR           webdataset tar shards, CLIP_benchmark's layout: DIR/train/0.tar,",
        "                  DIR/test/0.tar, ... and DIR/classnames.txt; samples with a",
        "                  jpg/png/webp image and a cls label; ids are the samples' keys",
        "wds:PATTERN       shards by brace pattern (wds:shards/train-{000..099}.tar), each",
        "                  shard's split from its folder or file name; or name them:",
        "                  wds:train=PATTERN;test=PATTERN",
        "hfds:NAME[:CONFIG] a Hugging Face dataset (datasets.load_dataset; a local folder of",
        "                  parquet files offline); hfds-disk:DIR a save_to_disk folder.",
        "                  Columns: the Image and ClassLabel features, or --image-column and",
        "                  --label-column; pip install 'featcache[hf]'. (hf: names backbones.)",
        "",
        "--splits train,test picks splits by name; test=validation stores a dataset's",
        "validation split as the store's test split.",
    ]
    return "\n".join(rows)

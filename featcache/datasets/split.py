"""A split: labelled images with stable ids, from files or an array; class-balanced subsets."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from featcache.errors import BadImageError, DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = ("train", "test")


def open_image(path: Path | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file, or an image's bytes called ``name`` (any mode), refusing
    decompression bombs. Raises BadImageError, naming the file."""
    name = name or str(path)
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(name, f"decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(name, f"{type(exc).__name__}: {exc}") from None
    return img


@dataclass
class Split:
    """One split: ids, labels and a way to decode image i. Sources are a folder, an array, or
    ``reader(where[i])`` (a sample in a tar shard, a row of a Hugging Face dataset)."""

    name: str
    class_names: list[str]
    ids: list[str]  # stable sample ids: path relative to the split folder, or "train/00042"
    labels: np.ndarray  # (N,) int64
    root: Path | None = None  # image folder of the split; ids are paths relative to it
    array: np.ndarray | None = field(default=None, repr=False)  # (N, H, W[, 3]) uint8
    sizes: list[int] | None = None  # file sizes, for the dataset identity
    where: list[Any] | None = field(default=None, repr=False)  # where sample i lies, for reader
    reader: Callable[[Any], Image.Image] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> Image.Image:
        """Decode image i (any mode; callers convert to RGB). Raises BadImageError."""
        if self.array is not None:
            return Image.fromarray(self.array[i])
        if self.reader is not None:
            return self.reader(self.where[i])
        return open_image(self.root / self.ids[i])

    def select(self, indices: np.ndarray) -> Split:
        idx = [int(i) for i in indices]
        return Split(
            name=self.name,
            class_names=self.class_names,
            ids=[self.ids[i] for i in idx],
            labels=self.labels[idx],
            root=self.root,
            array=self.array[idx] if self.array is not None else None,
            sizes=[self.sizes[i] for i in idx] if self.sizes is not None else None,
            where=[self.where[i] for i in idx] if self.where is not None else None,
            reader=self.reader,
        )

    def identity(self) -> str:
        """A digest of which samples this split holds (ids, labels, file sizes)."""
        h = hashlib.sha256()
        for i, (sid, label) in enumerate(zip(self.ids, self.labels.tolist())):
            size = self.sizes[i] if self.sizes is not None else -1
            h.update(f"{sid}\0{label}\0{size}\n".encode())
        if self.array is not None:
            h.update(hashlib.sha256(np.ascontiguousarray(self.array).tobytes()).digest())
        return h.hexdigest()[:16]


def balanced_subset(split: Split, per_class: int | None, seed: int) -> Split:
    """The same ``per_class`` samples of every class for the same seed, in listing order."""
    if per_class is None:
        return split
    if per_class < 1:
        raise DatasetError(f"per-class count must be at least 1, got {per_class}")
    rng = np.random.default_rng([seed, zlib.crc32(split.name.encode())])
    chosen = []
    for c, name in enumerate(split.class_names):
        members = np.flatnonzero(split.labels == c)
        if len(members) < per_class:
            raise DatasetError(
                f"{split.name}/{name} has {len(members)} images, fewer than the "
                f"{per_class} per class asked; lower --per-class"
            )
        chosen.append(np.sort(rng.permutation(members)[:per_class]))
    return split.select(np.sort(np.concatenate(chosen)))


def refuse_escape(path: Path, root: Path, resolve: bool = False) -> None:
    """Symlinks may lead anywhere inside the dataset root, never out of it. ``resolve``
    checks every component of the path, else only the path itself."""
    if (resolve or path.is_symlink()) and not path.resolve().is_relative_to(root):
        raise DatasetError(f"{path} is a symlink leading outside the dataset root {root}")


def class_order(names) -> list[str]:
    """Class names of text labels in order: numbers as numbers ("2" before "10"), then names
    alphabetically."""
    return sorted(set(names), key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))


def numbered_ids(split: str, count: int, width: int) -> list[str]:
    """Ids of samples known by their position: ``split/00042`` (zero-padded to ``width``)."""
    return [f"{split}/{i:0{width}d}" for i in range(count)]


def relative_id(path: str, source: str) -> str:
    """A path from a list file as a sample id: relative, inside the list's root, POSIX."""
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise DatasetError(
            f"{source}: {path!r} is not a path inside the dataset's folder; list image paths "
            "relative to it, without '..'"
        )
    return str(pure)


def file_split(
    name: str, class_names: list[str], root: Path, entries: list[tuple[str, int]], source: str
) -> Split:
    """A split of image files listed as (id relative to ``root``, label), checked to exist."""
    root = root.resolve()
    sizes, missing, folders = [], [], set()
    for sid, _ in entries:
        path = os.path.join(root, sid)
        folder = os.path.dirname(path)
        if folder not in folders:  # a listed path may pass through a symlinked folder
            refuse_escape(Path(folder), root, resolve=True)
            folders.add(folder)
        try:
            if os.path.islink(path):
                refuse_escape(Path(path), root)
            sizes.append(os.stat(path).st_size)
        except FileNotFoundError:
            missing.append(sid)
    if missing:
        raise DatasetError(
            f"{source}: {len(missing)} listed images are missing under {root} "
            f"(e.g. {missing[:3]}); the copy is incomplete"
        )
    if not entries:
        raise DatasetError(f"{source}: the {name} split lists no images")
    return Split(
        name=name,
        class_names=class_names,
        ids=[sid for sid, _ in entries],
        labels=np.asarray([label for _, label in entries], dtype=np.int64),
        root=root,
        sizes=sizes,
    )

"""Datasets: labelled images with stable ids, split by split, and class-balanced subsets.

Specs:
    ``cifar10``          the official CIFAR-10 archive, downloaded into ``data/`` (or an existing
                         copy under ``--data-root``), read without unpickling arbitrary objects.
    ``imagefolder:DIR``  ``DIR/<split>/<class>/<image>``, e.g. ``../shared/data/cifar10-jpeg``
                         once unpacked.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from featcache.errors import BadImageError, DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = ("train", "test")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass
class Split:
    """One split: ids, labels and a way to decode image i. Sources are a folder or an array."""

    name: str
    class_names: list[str]
    ids: list[str]  # stable sample ids: path relative to the split folder, or "train/00042"
    labels: np.ndarray  # (N,) int64
    root: Path | None = None  # image folder of the split; ids are paths relative to it
    array: np.ndarray | None = field(default=None, repr=False)  # (N, H, W, 3) uint8
    sizes: list[int] | None = None  # file sizes, for the dataset identity

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> Image.Image:
        """Decode image i (any mode; callers convert to RGB). Raises BadImageError."""
        if self.array is not None:
            return Image.fromarray(self.array[i])
        path = self.root / self.ids[i]
        try:
            with warnings.catch_warnings():
                # PIL only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
                img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImageError(str(path), f"decompression bomb refused ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImageError(str(path), f"{type(exc).__name__}: {exc}") from None
        return img

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


def load_dataset(
    spec: str, data_root: str | Path | None = None, splits: tuple[str, ...] = SPLITS
) -> dict[str, Split]:
    """Parse a dataset spec and list the asked splits that it has (no image is decoded)."""
    if spec == "cifar10":
        return _cifar10(Path(data_root) if data_root else Path("data"))
    if spec.startswith("imagefolder:"):
        root = spec.split(":", 1)[1]
        if not root:
            raise DatasetError("imagefolder: needs a directory, e.g. imagefolder:path/to/images")
        return _imagefolder(Path(root).expanduser(), splits)
    raise DatasetError(
        f"unknown dataset {spec!r}; use 'cifar10' or 'imagefolder:DIR' "
        "(DIR holds train/ and test/, each with one folder per class)"
    )


def dataset_identity(spec: str) -> str:
    """The part of a spec that names the data independently of where it lies on disk."""
    return "cifar10" if spec == "cifar10" else "imagefolder"


# ---------------------------------------------------------------------------------------------


def _imagefolder(root: Path, wanted: tuple[str, ...]) -> dict[str, Split]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    root = root.resolve()
    present = [s for s in SPLITS if (root / s).is_dir()]
    for s in present:
        _refuse_escape(root / s, root)
    if not present:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DatasetError(
            f"dataset folder {root} has no train/ or test/ split folder "
            f"(found: {found or 'none'}); expected DIR/train/<class>/*.jpg and "
            "DIR/test/<class>/*.jpg"
        )
    classes = _class_names(root / present[0])
    splits = {}
    for name in (s for s in present if s in wanted):
        split_root = root / name
        own = _class_names(split_root)
        extra = sorted(set(own) - set(classes))
        if extra:
            raise DatasetError(f"{split_root} has classes {extra} that {present[0]}/ lacks")
        ids, labels, sizes = [], [], []
        for c, cls in enumerate(classes):
            cdir = split_root / cls
            _refuse_escape(cdir, root)
            files = _image_files(cdir, root) if cdir.is_dir() else []
            if not files:
                raise DatasetError(
                    f"class folder {cdir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "add images or remove the folder"
                )
            for f, size in files:
                ids.append(f"{cls}/{f}")
                labels.append(c)
                sizes.append(size)
        splits[name] = Split(
            name=name,
            class_names=classes,
            ids=ids,
            labels=np.asarray(labels, dtype=np.int64),
            root=split_root,
            sizes=sizes,
        )
    return splits


def _refuse_escape(path: Path, root: Path) -> None:
    """Split folders, class folders and files may be symlinks, but only to inside the root."""
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        raise DatasetError(f"{path} is a symlink leading outside the dataset root {root}")


def _class_names(split_root: Path) -> list[str]:
    names = sorted(
        e.name for e in os.scandir(split_root) if e.is_dir() and not e.name.startswith(".")
    )
    for name in names:
        if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
            raise DatasetError(
                f"class folder name {name!r} in {split_root} is not a plain name; rename it"
            )
    if not names:
        raise DatasetError(f"{split_root} is empty: expected one folder per class")
    return names


def _image_files(cdir: Path, root: Path) -> list[tuple[str, int]]:
    # Plain strings and DirEntry calls: a Path per file made listing CIFAR's 50,000 training
    # images take 0.8 s, a visible share of a short extraction.
    out = []
    for e in sorted(os.scandir(cdir), key=lambda e: e.name):
        if e.name.startswith(".") or not e.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if e.is_symlink():
            _refuse_escape(Path(e.path), root)
        if e.is_file():
            out.append((e.name, e.stat().st_size))
    return out


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles carry raw bytes; pure and safe
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise DatasetError(f"{path}: not a CIFAR-10 batch ({exc})") from exc
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar10(data_root: Path) -> dict[str, Split]:
    folder = data_root / CIFAR10_DIR
    if not folder.is_dir():
        _download_cifar10(data_root)
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    splits = {}
    for name, batches in files.items():
        arrays, labels = [], []
        for b in batches:
            if not (folder / b).is_file():
                raise DatasetError(f"{folder / b} is missing: the CIFAR-10 copy is incomplete")
            d = _read_batch(folder / b)
            arrays.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(d["labels"])
        array = np.ascontiguousarray(np.concatenate(arrays).transpose(0, 2, 3, 1))
        splits[name] = Split(
            name=name,
            class_names=list(CIFAR10_CLASSES),
            ids=[f"{name}/{i:05d}" for i in range(len(array))],
            labels=np.asarray(labels, dtype=np.int64),
            array=array,
        )
    return splits


def _download_cifar10(data_root: Path) -> None:
    data_root.mkdir(parents=True, exist_ok=True)
    archive = data_root / "cifar-10-python.tar.gz"
    if not archive.is_file():
        tmp = archive.with_suffix(".part")
        try:
            with urllib.request.urlopen(CIFAR10_URL, timeout=30) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DatasetError(
                f"cannot download CIFAR-10 from {CIFAR10_URL} ({exc}). Without network, use an "
                "image folder (e.g. --dataset imagefolder:DIR with ../shared/data/cifar10-jpeg "
                "unpacked into DIR) or point --data-root at a folder holding "
                f"{CIFAR10_DIR}/ or cifar-10-python.tar.gz"
            ) from exc
        os.replace(tmp, archive)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != CIFAR10_MD5:
        raise DatasetError(f"{archive}: md5 {digest} is not CIFAR-10's {CIFAR10_MD5}; delete it")
    with tarfile.open(fileobj=io.BytesIO(archive.read_bytes()), mode="r:gz") as tar:
        tar.extractall(data_root, filter="data")

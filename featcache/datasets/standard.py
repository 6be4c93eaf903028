"""The field's standard datasets, in torchvision's on-disk layout under ``--data-root``.

Each is read by featcache's own reader, with its official splits and class names: no pickled
object beyond plain arrays, bytes and lists is ever loaded (CIFAR), ``.mat`` files go through
scipy, idx and STL-10 binaries through numpy. URLs, checksums and class names are
torchvision's, so a copy that torchvision downloaded is found as it lies. Missing files are
downloaded where a network is reachable; without one, the error says which files to put where.

``train`` is all of a dataset's official training data: Flowers-102 and DTD publish a
validation split beside it, which joins ``train`` (featcache's probe holds out its own).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.datasets.split import Split, file_split, numbered_ids, relative_id
from featcache.errors import DatasetError


@dataclass(frozen=True)
class Resource:
    """One published file: where it comes from and where under the data root it goes."""

    url: str
    md5: str
    into: str = ""  # folder under the data root (extracted there when an archive)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


@dataclass(frozen=True)
class Standard:
    name: str
    description: str
    # Paths under the data root that a complete copy has (what the reader opens).
    needs: tuple[str, ...]
    # The published files, from torchvision's dataset class (imported only when needed).
    resources: Callable[[], tuple[Resource, ...]]
    read: Callable[[Path], dict[str, Split]]


DATASETS: dict[str, Standard] = {}


def _standard(name: str, description: str, needs: tuple[str, ...], resources: Callable):
    def deco(read):
        DATASETS[name] = Standard(name, description, needs, resources, read)
        return read

    return deco


def load_standard(name: str, data_root: Path) -> dict[str, Split]:
    """The splits of a standard dataset, fetched first if its files are not all there."""
    ds = DATASETS[name]
    if not all((data_root / p).exists() for p in ds.needs):
        _fetch_all(ds, data_root)
    return ds.read(data_root)


# ---------------------------------------------------------------------------------------------
# Fetching


def _fetch_all(ds: Standard, data_root: Path) -> None:
    resources = ds.resources()
    try:
        for r in resources:
            _fetch(r, data_root)
    except OSError as exc:
        missing = [str(data_root / p) for p in ds.needs if not (data_root / p).exists()]
        files = "; ".join(f"{r.url} (md5 {r.md5}) into {data_root / r.into}" for r in resources)
        raise DatasetError(
            f"{ds.name}: {', '.join(missing)} not found, and downloading it failed "
            f"({type(exc).__name__}: {exc}). Without network, put these files there and rerun "
            f"(archives are unpacked where they lie): {files}. Or pass --data-root DIR where "
            "a copy in torchvision's layout lies"
        ) from exc
    still = [p for p in ds.needs if not (data_root / p).exists()]
    if still:
        raise DatasetError(f"{ds.name}: {still} missing under {data_root} after unpacking")


def _fetch(r: Resource, data_root: Path) -> None:
    folder = data_root / r.into
    path = folder / r.filename
    if not path.is_file():
        part = path.with_name(path.name + ".part")
        with urllib.request.urlopen(r.url, timeout=30) as src:  # offline: fails here, at once
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        os.replace(part, path)
    digest = _md5(path)
    if digest != r.md5:
        raise DatasetError(f"{path}: md5 {digest} is not the published {r.md5}; delete it")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as tar:
            tar.extractall(folder, filter="data")
    elif path.suffix == ".gz":
        with gzip.open(path) as src, open(path.with_suffix(""), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tv(name: str):
    import torchvision.datasets

    return getattr(torchvision.datasets, name)


# ---------------------------------------------------------------------------------------------
# CIFAR: pickled batches, read by an unpickler that builds plain arrays and nothing else


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


def _read_batch(path: Path, keys: tuple[str, ...]) -> dict:
    """A CIFAR batch as a dict with ``str`` keys, holding ``keys``. Python 2's batches (the
    published ones: ``bytes`` keys and names) and Python 3's (``str``, as torchvision's test
    fixtures write them) read alike; anything else is an error naming the file."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the CIFAR copy is incomplete")
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError) as exc:  # fmt: skip
        raise DatasetError(f"{path}: not a CIFAR batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: not a CIFAR batch (a {type(d).__name__}, not a dict)")
    d = {_text(k): v for k, v in d.items()}
    missing = [k for k in keys if k not in d]
    if missing:
        raise DatasetError(
            f"{path}: a CIFAR batch needs the keys {list(keys)}; {missing} missing "
            f"(it has {sorted(map(str, d))[:8]})"
        )
    return d


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cifar(folder: Path, batches: dict, label_key: str, class_names: list[str]) -> dict:
    splits = {}
    for name, files in batches.items():
        arrays, labels = [], []
        for b in files:
            d = _read_batch(folder / b, ("data", label_key))
            data = np.asarray(d["data"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DatasetError(
                    f"{folder / b}: 'data' must be uint8 rows of 3x32x32 pixels, got "
                    f"{data.dtype} {data.shape}"
                )
            arrays.append(data.reshape(-1, 3, 32, 32))
            own = np.asarray(d[label_key]).ravel()
            if own.dtype.kind not in "iu" or len(own) != len(data):
                raise DatasetError(
                    f"{folder / b}: {label_key!r} must be {len(data)} integers, one per image, "
                    f"got {len(own)} of {own.dtype}"
                )
            labels.extend(own.tolist())
        array = np.ascontiguousarray(np.concatenate(arrays).transpose(0, 2, 3, 1))
        splits[name] = _array_split(name, class_names, array, labels)
    return splits


def _array_split(name: str, class_names: list[str], array: np.ndarray, labels) -> Split:
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if len(labels) != len(array) or not ((labels >= 0) & (labels < len(class_names))).all():
        raise DatasetError(f"{name}: {len(array)} images but labels {labels[:5]}... do not fit")
    return Split(
        name=name,
        class_names=class_names,
        ids=numbered_ids(name, len(array), 5),
        labels=labels,
        array=array,
    )


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _cifar_resources(cls: str) -> tuple[Resource, ...]:
    c = _tv(cls)
    return (Resource(c.url, c.tgz_md5),)


@_standard(
    "cifar10",
    "CIFAR-10: 10 classes, 50,000 / 10,000 images, 32x32",
    ("cifar-10-batches-py",),
    lambda: _cifar_resources("CIFAR10"),
)
def _cifar10(root: Path) -> dict[str, Split]:
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _cifar(root / "cifar-10-batches-py", batches, "labels", list(CIFAR10_CLASSES))


@_standard(
    "cifar100",
    "CIFAR-100: 100 classes (fine labels), 50,000 / 10,000 images, 32x32",
    ("cifar-100-python",),
    lambda: _cifar_resources("CIFAR100"),
)
def _cifar100(root: Path) -> dict[str, Split]:
    folder = root / "cifar-100-python"
    meta = _read_batch(folder / "meta", ("fine_label_names",))
    names = [_text(n) for n in meta["fine_label_names"]]
    return _cifar(folder, {"train": ["train"], "test": ["test"]}, "fine_labels", names)


# ---------------------------------------------------------------------------------------------
# Arrays in binary and .mat files


def _stl10_resources() -> tuple[Resource, ...]:
    c = _tv("STL10")
    return (Resource(c.url, c.tgz_md5),)


@_standard(
    "stl10",
    "STL-10: 10 classes, 5,000 / 8,000 labelled images, 96x96 (the unlabelled set unused)",
    tuple(
        f"stl10_binary/{f}"
        for f in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")
    ),  # fmt: skip
    _stl10_resources,
)
def _stl10(root: Path) -> dict[str, Split]:
    folder = root / "stl10_binary"
    names = (folder / "class_names.txt").read_text().split()
    splits = {}
    for name in ("train", "test"):
        raw = np.fromfile(folder / f"{name}_X.bin", dtype=np.uint8)
        if raw.size % (3 * 96 * 96):
            raise DatasetError(f"{folder / f'{name}_X.bin'}: not a whole number of 96x96 images")
        # Stored column-major per channel: (N, 3, W, H) -> (N, H, W, 3).
        array = np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1))
        labels = np.fromfile(folder / f"{name}_y.bin", dtype=np.uint8).astype(np.int64) - 1
        splits[name] = _array_split(name, names, array, labels)
    return splits


def _svhn_resources() -> tuple[Resource, ...]:
    table = _tv("SVHN").split_list
    return tuple(Resource(table[s][0], table[s][2]) for s in ("train", "test"))


@_standard(
    "svhn",
    "SVHN (cropped digits): 10 classes, 73,257 / 26,032 images, 32x32 (extra unused)",
    ("train_32x32.mat", "test_32x32.mat"),
    _svhn_resources,
)
def _svhn(root: Path) -> dict[str, Split]:
    splits = {}
    for name in ("train", "test"):
        mat = _loadmat(root / f"{name}_32x32.mat")
        array = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
        labels = np.asarray(mat["y"], dtype=np.int64).ravel() % 10  # digit 0 is labelled 10
        splits[name] = _array_split(name, [str(d) for d in range(10)], array, labels)
    return splits


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path, squeeze_me=False)
    except (OSError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: not a readable .mat file ({exc})") from exc


def _mnist_resources(cls: str) -> tuple[Resource, ...]:
    c = _tv(cls)
    return tuple(Resource(c.mirrors[0] + f, md5, f"{cls}/raw") for f, md5 in c.resources)


def _idx(path: Path, dims: int) -> np.ndarray:
    """An idx file (MNIST's format): a big-endian header, then uint8 data."""
    data = path.read_bytes()
    if len(data) < 4 + 4 * dims or data[:4] != bytes([0, 0, 8, dims]):
        raise DatasetError(f"{path}: not a {dims}-d uint8 idx file")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says {shape}, the file holds {body.size} values")
    return body.reshape(shape)


def _mnist_like(name: str, cls: str, description: str) -> None:
    """MNIST and Fashion-MNIST: idx files in torchvision's ``<cls>/raw/`` (.gz unpacked)."""
    files = [
        f"{p}-{kind}"
        for p in ("train", "t10k")
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]

    def read(root: Path) -> dict[str, Split]:
        folder, classes = root / cls / "raw", list(_tv(cls).classes)
        splits = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            array = _idx(folder / f"{prefix}-images-idx3-ubyte", 3).copy()  # (N, 28, 28) grey
            labels = _idx(folder / f"{prefix}-labels-idx1-ubyte", 1)
            splits[split] = _array_split(split, classes, array, labels)
        return splits

    needs = tuple(f"{cls}/raw/{f}" for f in files)
    _standard(name, description, needs, lambda: _mnist_resources(cls))(read)


_mnist_like("mnist", "MNIST", "MNIST: 10 digits, 60,000 / 10,000 images, 28x28 greyscale")
_mnist_like(
    "fashion-mnist",
    "FashionMNIST",
    "Fashion-MNIST: 10 classes, 60,000 / 10,000 images, 28x28 greyscale",
)


# ---------------------------------------------------------------------------------------------
# Photos listed by annotation files


def _flowers_resources() -> tuple[Resource, ...]:
    c = _tv("Flowers102")
    return tuple(Resource(c._download_url_prefix + f, md5, "flowers-102") for f, md5 in
                 c._file_dict.values())  # fmt: skip


@_standard(
    "flowers102",
    "Oxford Flowers-102: 102 classes, 2,040 (train+val) / 6,149 photos",
    ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
    _flowers_resources,
)
def _flowers102(root: Path) -> dict[str, Split]:
    folder = root / "flowers-102"
    labels = np.asarray(_loadmat(folder / "imagelabels.mat")["labels"]).ravel() - 1
    sets = _loadmat(folder / "setid.mat")
    names = list(_tv("Flowers102").classes)
    splits = {}
    for name, keys in (("train", ("trnid", "valid")), ("test", ("tstid",))):
        ids = np.concatenate([np.asarray(sets[k]).ravel() for k in keys])
        entries = [(f"image_{i:05d}.jpg", int(labels[i - 1])) for i in sorted(ids.tolist())]
        splits[name] = file_split(name, names, folder / "jpg", entries, "flowers102")
    return splits


def _pets_resources() -> tuple[Resource, ...]:
    return tuple(Resource(url, md5, "oxford-iiit-pet") for url, md5 in
                 _tv("OxfordIIITPet")._RESOURCES)  # fmt: skip


@_standard(
    "pets",
    "Oxford-IIIT Pets: 37 breeds, 3,680 (trainval) / 3,669 photos",
    (
        "oxford-iiit-pet/images",
        "oxford-iiit-pet/annotations/trainval.txt",
        "oxford-iiit-pet/annotations/test.txt",
    ),  # fmt: skip
    _pets_resources,
)
def _pets(root: Path) -> dict[str, Split]:
    folder = root / "oxford-iiit-pet"
    listed = {}
    names: dict[int, str] = {}
    for name, file in (("train", "trainval.txt"), ("test", "test.txt")):
        rows = []
        for line in (folder / "annotations" / file).read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            image_id, label, *_ = line.split()
            rows.append((relative_id(f"{image_id}.jpg", file), int(label) - 1))
            # As torchvision names them: "great_pyrenees_12" -> "Great Pyrenees".
            breed = image_id.rsplit("_", 1)[0]
            names[int(label) - 1] = " ".join(p.title() for p in breed.split("_"))
        listed[name] = rows
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{folder / 'annotations'}: breed labels {sorted(names)} have gaps")
    classes = [names[i] for i in range(len(names))]
    return {
        name: file_split(name, classes, folder / "images", rows, "pets")
        for name, rows in listed.items()
    }


@_standard(
    "dtd",
    "Describable Textures: 47 classes, 3,760 (train+val, partition 1) / 1,880 photos",
    ("dtd/dtd/images", *(f"dtd/dtd/labels/{s}1.txt" for s in ("train", "val", "test"))),
    lambda: (Resource(_tv("DTD")._URL, _tv("DTD")._MD5, "dtd"),),
)
def _dtd(root: Path) -> dict[str, Split]:
    folder = root / "dtd" / "dtd"
    listed = {
        name: [
            relative_id(line.strip(), f"{file}.txt")
            for file in files
            for line in (folder / "labels" / f"{file}.txt").read_text().splitlines()
            if line.strip()
        ]
        for name, files in (("train", ("train1", "val1")), ("test", ("test1",)))
    }
    classes = sorted({sid.split("/", 1)[0] for sid in listed["train"]})
    extra = sorted({sid.split("/", 1)[0] for sid in listed["test"]} - set(classes))
    if extra:
        raise DatasetError(f"{folder / 'labels'}: test classes {extra} are not in train")
    index = {c: i for i, c in enumerate(classes)}
    return {
        name: file_split(
            name, classes, folder / "images", [(s, index[s.split("/")[0]]) for s in ids], "dtd"
        )
        for name, ids in listed.items()
    }


@_standard(
    "food101",
    "Food-101: 101 classes, 75,750 / 25,250 photos",
    ("food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"),
    lambda: (Resource(_tv("Food101")._URL, _tv("Food101")._MD5),),
)
def _food101(root: Path) -> dict[str, Split]:
    folder = root / "food-101"
    splits = {}
    for name in ("train", "test"):
        meta = json.loads((folder / "meta" / f"{name}.json").read_text())
        classes = sorted(meta)
        entries = [
            (relative_id(f"{item}.jpg", f"{name}.json"), c)
            for c, cls in enumerate(classes)
            for item in meta[cls]
        ]
        splits[name] = file_split(name, classes, folder / "images", entries, "food101")
    return splits

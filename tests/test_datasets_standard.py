"""The standard datasets: small fixtures in each published format, made at run time.

Each fixture is laid out as torchvision lays the real dataset out under its root; featcache's
reader must see what torchvision's own dataset class sees there (same images, labels and class
names), except that it never unpickles and joins a published validation split to ``train``.
"""

import gzip
import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from featcache.datasets import dataset_identity, load_dataset
from featcache.datasets.standard import DATASETS, Resource
from featcache.errors import DatasetError
from featcache.preprocessing import to_rgb

RNG = np.random.default_rng(0)


def _pixels(n, h, w, c=3):
    return RNG.integers(0, 256, (n, h, w, c) if c else (n, h, w), dtype=np.uint8)


def _photo(path, label):
    """A small JPEG whose colour depends on the label, of a size that varies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (40 + 7 * label, 30 + 3 * label)
    Image.fromarray(_pixels(1, size[1], size[0])[0]).save(path, "JPEG")


def make_cifar100(root, text=bytes):
    """CIFAR-100 as published (Python 2 pickles: ``bytes`` keys and names), or with
    ``text=str`` as Python 3 pickles them (torchvision's own test fixtures)."""
    _make_cifar(root / "cifar-100-python", text, {"train": 12, "test": 5}, "fine_labels", 100)
    key = (lambda k: k.encode()) if text is bytes else (lambda k: k)
    meta = {key("fine_label_names"): [key(f"class{i:02d}") for i in range(100)]}
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def make_cifar10(root, text=str):
    files = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
    _make_cifar(root / "cifar-10-batches-py", text, files, "labels", 10)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]  # fmt: skip
    meta = {"label_names": names, "num_cases_per_batch": 3, "num_vis": 3072}
    (root / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(meta))


def _make_cifar(folder, text, files, label_key, classes):
    key = (lambda k: k.encode()) if text is bytes else (lambda k: k)
    folder.mkdir(parents=True)
    for name, n in files.items():
        batch = {
            key("data"): _pixels(n, 32, 32).transpose(0, 3, 1, 2).reshape(n, -1),
            key(label_key): RNG.integers(0, classes, n).tolist(),
            key("coarse_labels"): RNG.integers(0, 20, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if text is bytes else 4))


def make_stl10(root):
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    names = "airplane bird car cat deer dog horse monkey ship truck".split()
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    for split, n in (("train", 6), ("test", 4)):
        images = _pixels(n, 96, 96)  # (N, H, W, 3), stored as (N, 3, W, H)
        (d / f"{split}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())
        (d / f"{split}_y.bin").write_bytes((RNG.integers(0, 10, n) + 1).astype(np.uint8).tobytes())


def make_svhn(root):
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 7), ("test", 4)):
        x = _pixels(n, 32, 32).transpose(1, 2, 3, 0)  # (32, 32, 3, N)
        y = np.array([[10], [1], [2], [10], [9], [3], [4]][:n], dtype=np.uint8)
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


def _idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


def _make_mnist(root, folder):
    d = root / folder / "raw"
    d.mkdir(parents=True)
    for prefix, n in (("train", 8), ("t10k", 5)):
        _idx(d / f"{prefix}-images-idx3-ubyte", _pixels(n, 28, 28, 0))
        _idx(d / f"{prefix}-labels-idx1-ubyte", RNG.integers(0, 10, n).astype(np.uint8))


def make_mnist(root):
    _make_mnist(root, "MNIST")


def make_fashion_mnist(root):
    _make_mnist(root, "FashionMNIST")


def make_flowers102(root):
    from scipy.io import savemat

    d = root / "flowers-102"
    labels = np.array([1, 2, 3, 1, 2, 3, 102, 1, 2])
    for i, label in enumerate(labels, start=1):
        _photo(d / "jpg" / f"image_{i:05d}.jpg", label)
    savemat(d / "imagelabels.mat", {"labels": labels[None]})
    savemat(d / "setid.mat", {"trnid": [[4, 1, 2]], "valid": [[3, 7]], "tstid": [[5, 6, 8, 9]]})


def make_pets(root):
    d = root / "oxford-iiit-pet"
    rows = {"trainval": ["Abyssinian_1", "great_pyrenees_2", "Abyssinian_3"], "test": [
        "great_pyrenees_4", "Abyssinian_5"]}  # fmt: skip
    for split, ids in rows.items():
        lines = []
        for image_id in ids:
            label = 1 if image_id.startswith("Aby") else 2
            _photo(d / "images" / f"{image_id}.jpg", label)
            lines.append(f"{image_id} {label} {label} 1")
        (d / "annotations").mkdir(parents=True, exist_ok=True)
        (d / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def make_dtd(root):
    d = root / "dtd" / "dtd"
    files = {"train1": ["banded/banded_0001.jpg", "zigzagged/zigzagged_0001.jpg"],
             "val1": ["banded/banded_0002.jpg", "zigzagged/zigzagged_0002.jpg"],
             "test1": ["banded/banded_0003.jpg", "zigzagged/zigzagged_0003.jpg"]}  # fmt: skip
    (d / "labels").mkdir(parents=True)
    for split, rel in files.items():
        for r in rel:
            _photo(d / "images" / r, 1 if r.startswith("b") else 2)
        (d / "labels" / f"{split}.txt").write_text("\n".join(rel) + "\n")


def make_food101(root):
    d = root / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "ramen": ["ramen/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "ramen": ["ramen/5", "ramen/6"]}}  # fmt: skip
    (d / "meta").mkdir(parents=True)
    for split, classes in meta.items():
        for c, items in classes.items():
            for item in items:
                _photo(d / "images" / f"{item}.jpg", len(c))
        (d / "meta" / f"{split}.json").write_text(json.dumps(classes))


MAKERS = {
    "cifar10": make_cifar10,
    "cifar100": make_cifar100,
    "cifar100-str": lambda root: make_cifar100(root, str),
    "stl10": make_stl10,
    "svhn": make_svhn,
    "mnist": make_mnist,
    "fashion-mnist": make_fashion_mnist,
    "flowers102": make_flowers102,
    "pets": make_pets,
    "dtd": make_dtd,
    "food101": make_food101,
}


def _torchvision(name, root, split, monkeypatch):
    """torchvision's own dataset class over the same files (its checksums of the published
    files patched out: the fixtures are not those files)."""
    import torchvision.datasets as tv

    for cls in (tv.STL10, tv.SVHN, tv.Flowers102, tv.CIFAR10, tv.CIFAR100):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv.cifar, "check_integrity", lambda path, md5=None: True)
    r = str(root)
    return {
        "cifar10": lambda: tv.CIFAR10(r, train=split == "train"),
        "cifar100-str": lambda: tv.CIFAR100(r, train=split == "train"),
        "stl10": lambda: tv.STL10(r, split=split),
        "svhn": lambda: tv.SVHN(r, split=split),
        "mnist": lambda: tv.MNIST(r, train=split == "train"),
        "fashion-mnist": lambda: tv.FashionMNIST(r, train=split == "train"),
        "flowers102": lambda: tv.Flowers102(r, split=split),
        "pets": lambda: tv.OxfordIIITPet(r, split="trainval" if split == "train" else split),
        "dtd": lambda: tv.DTD(r, split=split),
        "food101": lambda: tv.Food101(r, split=split),
    }[name]()


def _content(images_and_labels, names):
    """Order-free: (class name, digest of the RGB pixels) of every sample."""
    return sorted(
        (names[label], hashlib.sha256(np.asarray(to_rgb(img)).tobytes()).hexdigest())
        for img, label in images_and_labels
    )


@pytest.mark.parametrize("name", sorted(set(MAKERS) - {"cifar100"}))
def test_the_reader_sees_what_torchvision_sees(name, tmp_path, monkeypatch):
    """Every reader; CIFAR as Python 3 pickles it (``str`` keys and names, torchvision's test
    fixtures), which ended in "'str' object has no attribute 'decode'" before."""
    MAKERS[name](tmp_path)
    ours = load_dataset(name.removesuffix("-str"), data_root=tmp_path)
    assert sorted(ours) == ["test", "train"]
    for split, s in ours.items():
        theirs = [_torchvision(name, tmp_path, split, monkeypatch)]
        if split == "train" and name in ("flowers102", "dtd"):  # the published val joins train
            theirs.append(_torchvision(name, tmp_path, "val", monkeypatch))
        names = getattr(theirs[0], "classes", None) or [str(d) for d in range(10)]  # SVHN
        assert s.class_names == list(names), split
        expected = [_content(t, t.classes if hasattr(t, "classes") else names) for t in theirs]
        got = _content(((s.load(i), s.labels[i]) for i in range(len(s))), s.class_names)
        assert got == sorted(sum(expected, [])), split
        assert len(set(s.ids)) == len(s)  # stable, unique ids


def test_cifar100_reads_fine_labels_and_their_names_without_unpickling_objects(tmp_path):
    make_cifar100(tmp_path)
    splits = load_dataset("cifar100", data_root=tmp_path)
    raw = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())
    train = splits["train"]
    assert train.class_names[:2] == ["class00", "class01"] and len(train.class_names) == 100
    assert train.labels.tolist() == raw[b"fine_labels"]
    first = raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(train.load(0)), first)
    assert len(splits["test"]) == 5

    class Boom:
        def __reduce__(self):
            return (print, ("ran code",))

    (tmp_path / "cifar-100-python" / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": [Boom()]})
    )
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        load_dataset("cifar100", data_root=tmp_path)


@pytest.mark.parametrize(
    "batch, expected",
    [
        ({"data": "torch", "labels": [0]}, "refusing to load torch"),
        ({"data": np.zeros((1, 3072), np.uint8)}, r"needs the keys \['data', 'labels'\]"),
        ({"data": np.zeros((1, 1024), np.uint8), "labels": [0]}, "uint8 rows of 3x32x32"),
        ([1, 2, 3], "a list, not a dict"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}, "2 integers, one per"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "2 integers, one per image"),
    ],
    ids=["tensor", "no-labels", "shape", "list", "text-labels", "too-few-labels"],
)
def test_an_unexpected_cifar_batch_is_an_error_naming_the_file_and_what_was_expected(
    tmp_path, batch, expected
):
    import torch

    make_cifar10(tmp_path)
    if isinstance(batch, dict) and isinstance(batch["data"], str):
        batch["data"] = torch.zeros(1, 3072, dtype=torch.uint8)  # how torch tensors pickle
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetError, match=expected) as err:
        load_dataset("cifar10", data_root=tmp_path)
    assert str(path) in str(err.value)


def test_greyscale_and_photos_of_many_sizes_extract_end_to_end(tmp_path):
    """MNIST's 28x28 greyscale arrays and Food-101's photos of several sizes, through the
    whole extraction; the store's dataset identity names the dataset."""
    import h5py

    from featcache.extraction.extract import ExtractConfig, extract

    make_mnist(tmp_path / "data")
    make_food101(tmp_path / "data")
    for name, n in (("mnist", 13), ("food101", 6)):
        cfg = ExtractConfig(
            backbone="test-tiny",
            dataset=name,
            data_root=str(tmp_path / "data"),
            out=str(tmp_path / f"{name}.h5"),
            workers=0,
            progress=False,
        )
        assert extract(cfg).images == n
        with h5py.File(tmp_path / f"{name}.h5") as f:
            fields = json.loads(f.attrs["fields"])
            assert fields["dataset"]["kind"] == name == dataset_identity(name)
            assert np.isfinite(f["train/features/pooled"][:]).all()


def _serve(monkeypatch, files: dict):
    """urllib as if the network were there, serving ``files`` (url -> bytes)."""
    import urllib.request

    def urlopen(url, timeout=None):
        return io.BytesIO(files[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def _tarball(folder, arcname) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buf.getvalue()


def test_missing_files_are_downloaded_checked_and_unpacked(tmp_path, monkeypatch):
    make_cifar100(tmp_path / "src")
    archive = _tarball(tmp_path / "src" / "cifar-100-python", "cifar-100-python")
    url = "https://example.org/cifar-100-python.tar.gz"
    md5 = hashlib.md5(archive).hexdigest()
    ds = DATASETS["cifar100"]
    monkeypatch.setitem(
        DATASETS,
        "cifar100",
        ds.__class__(**{**ds.__dict__, "resources": lambda: (Resource(url, md5),)}),  # fmt: skip
    )
    _serve(monkeypatch, {url: archive})
    splits = load_dataset("cifar100", data_root=tmp_path / "data")
    assert len(splits["train"]) == 12
    assert (tmp_path / "data" / "cifar-100-python.tar.gz").is_file()
    # A download that is not the published file is refused, and says what to do.
    (tmp_path / "data" / "cifar-100-python.tar.gz").unlink()
    import shutil

    shutil.rmtree(tmp_path / "data" / "cifar-100-python")
    _serve(monkeypatch, {url: archive[:-10] + b"0123456789"})
    with pytest.raises(DatasetError, match="is not the published .*delete it"):
        load_dataset("cifar100", data_root=tmp_path / "data")


def test_a_gz_put_in_place_by_hand_is_unpacked_without_network(tmp_path, monkeypatch):
    """Offline, the published .gz files put where the error says are enough."""
    make_mnist(tmp_path / "src")
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    resources = []
    for f in sorted((tmp_path / "src" / "MNIST" / "raw").iterdir()):
        packed = gzip.compress(f.read_bytes())
        (raw / f"{f.name}.gz").write_bytes(packed)
        url = f"https://example.org/{f.name}.gz"
        resources.append(Resource(url, hashlib.md5(packed).hexdigest(), "MNIST/raw"))
    ds = DATASETS["mnist"]
    monkeypatch.setitem(
        DATASETS, "mnist", ds.__class__(**{**ds.__dict__, "resources": lambda: tuple(resources)})
    )
    _serve(monkeypatch, {})  # any download would fail with a KeyError
    assert len(load_dataset("mnist", data_root=tmp_path / "data")["train"]) == 8


def test_offline_the_error_says_which_files_to_put_where(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    for name in sorted(DATASETS):
        with pytest.raises(DatasetError) as err:
            load_dataset(name, data_root=tmp_path / "data")
        message = str(err.value)
        for r in DATASETS[name].resources():
            assert r.url in message and r.md5 in message, name
            assert str(tmp_path / "data" / r.into) in message, name
        assert "--data-root" in message
    assert not (tmp_path / "data").exists()  # nothing left behind


def test_corrupt_files_name_the_file(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x09")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte: header says"):
        load_dataset("mnist", data_root=tmp_path)
    make_food101(tmp_path)
    (tmp_path / "food-101" / "images" / "ramen" / "5.jpg").unlink()
    with pytest.raises(DatasetError, match="1 listed images are missing.*ramen/5.jpg"):
        load_dataset("food101", data_root=tmp_path)
    make_dtd(tmp_path / "d")
    with open(tmp_path / "d" / "dtd" / "dtd" / "labels" / "test1.txt", "a") as f:
        f.write("../../../../etc/passwd\n")
    with pytest.raises(DatasetError, match="not a path inside the dataset's folder"):
        load_dataset("dtd", data_root=tmp_path / "d")

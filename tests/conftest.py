# ruff: noqa: E402  (the thread settings below come before numpy and torch are imported)
import os

# Under pytest-xdist (`make test` runs one worker per core) each worker, and every process its
# tests start, gets its share of the cores (those this process may run on, as xdist counts
# them), set before numpy and torch are imported: two workers whose thread pools fought over
# two cores took 415 s where one worker took 290 s (two workers of one thread each: 213 s).
# Thread counts the user set are kept.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (_CORES or 1) // _WORKERS)))

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import tiny_backbone  # noqa: F401  (registers test-tiny for every test)

REPO = Path(__file__).resolve().parents[1]
TINYCLI = Path(__file__).parent / "tinycli.py"
SHARED_CIFAR = (
    Path(os.environ.get("FEATCACHE_SHARED", REPO.parent / "shared")) / "data/cifar10-jpeg"
)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def make_image_folder(root: Path, classes=("cat", "dog", "frog"), train=12, test=4, size=32):
    """A tiny dataset whose classes differ in colour, so features can separate them."""
    rng = np.random.default_rng(0)
    colours = {c: rng.integers(0, 256, 3) for c in classes}
    for split, n in (("train", train), ("test", test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (size, size, 3))
                arr = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


def make_webdataset(folder: Path, root: Path, shards=(("train", 2), ("test", 1))) -> Path:
    """The images of an image folder as webdataset shards in CLIP_benchmark's layout
    (``root/<split>/<i>.tar``, ``root/classnames.txt``): sample key ``<class>_<file stem>``,
    the file's own bytes as its image, the class number as ``cls``. Splits are cut into
    ``count`` shards in listing order (the folder's)."""
    classes = sorted(p.name for p in (folder / "train").iterdir())
    (root).mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    for split, count in shards:
        files = [
            (c, f)
            for c, cls in enumerate(classes)
            for f in sorted((folder / split / cls).iterdir())
        ]
        (root / split).mkdir()
        for i in range(count):
            with tarfile.open(root / split / f"{i}.tar", "w") as tar:
                for c, f in files[i::count]:
                    key = f"{classes[c]}_{f.stem}"
                    for ext, data in ((f.suffix[1:], f.read_bytes()), ("cls", str(c).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


CIFAR_PER_CLASS = 200  # images unpacked per class and split: what any test takes, and more


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """The first CIFAR_PER_CLASS images of every class of ../shared/data/cifar10-jpeg,
    unpacked once per session (all 60,000 files took 25 s); tests skip where it is absent."""
    if not (SHARED_CIFAR / "test.tar.gz").is_file():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp("cifar10-jpeg")

    def wanted(member, path):
        parts = member.name.split("/")  # split/class/NNNN.jpg
        if len(parts) == 3 and int(parts[2].split(".")[0]) >= CIFAR_PER_CLASS:
            return None
        return tarfile.data_filter(member, path)

    for name in ("train", "test"):
        with tarfile.open(SHARED_CIFAR / f"{name}.tar.gz") as tar:
            tar.extractall(root, filter=wanted)
    return root


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """``random_weights(name)``: --weights for an entry (random weights of its real
    architecture), saved once per session."""
    from featcache.backbones import save_random_weights

    root, saved = tmp_path_factory.mktemp("random-weights"), {}

    def weights(name):
        if name not in saved:
            saved[name] = save_random_weights(name, root)
        return saved[name]

    return weights


def tiny_extract_args(folder, out, *extra) -> list[str]:
    """CLI arguments of `featcache extract` with the tiny backbone over an image folder (or a
    dataset spec)."""
    return [
        "extract",
        "--backbone",
        "test-tiny",
        "--dataset",
        _spec(folder),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
        *map(str, extra),
    ]


def tiny_config(dataset, out, **fields):
    """The ExtractConfig of the tiny backbone over an image folder (or a dataset spec), in
    this process (no loader workers, no progress bar)."""
    from featcache.extraction.extract import ExtractConfig

    return ExtractConfig(
        backbone="test-tiny", dataset=_spec(dataset), out=str(out), workers=0, progress=False,
        **fields,
    )  # fmt: skip


def _spec(dataset) -> str:
    """A dataset spec; a bare folder is an image folder."""
    return dataset if ":" in str(dataset) else f"imagefolder:{dataset}"


def tiny_extract(folder, out, *extra) -> list[str]:
    """The same as a command line for a separate process (tests/tinycli.py)."""
    return [sys.executable, str(TINYCLI), *tiny_extract_args(folder, out, *extra)]


def start(argv, **env) -> subprocess.Popen:
    """A real process, output captured as text, with extra environment variables."""
    return subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def assert_equal_stores(a, b, features=("pooled", "maxpool")):
    """Same fingerprint, ids (none missing or twice), labels and features in every split."""
    from featcache.store import Store

    a, b = Store(a), Store(b)
    assert a.fingerprint == b.fingerprint
    for split in ("train", "test"):
        for feat in features:
            x, y = a.load(split, feat), b.load(split, feat)
            assert x.ids == y.ids and len(set(x.ids)) == len(x.ids)
            np.testing.assert_array_equal(x.labels, y.labels)
            np.testing.assert_array_equal(x.features, y.features)

"""Hostile and broken input, made by the tests: each gets a clear error or a recorded skip,
and nothing is executed or read outside the data root."""

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from featcache.datasets import load_dataset
from featcache.errors import BadImageError, DatasetError, StoreError, WeightsError
from featcache.extraction.extract import ExtractConfig, extract
from featcache.store import Store


def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bad_crc_png():
    data = bytearray(_png_bytes(np.zeros((8, 8, 3), np.uint8)))
    ihdr_crc = 8 + 4 + 4 + 13  # signature, length, type, IHDR payload, then its CRC
    data[ihdr_crc : ihdr_crc + 4] = struct.pack(">I", zlib.crc32(b"wrong") & 0xFFFFFFFF)
    return bytes(data)


def _truncated_jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()[:200]


BAD = {
    "truncated.jpg": _truncated_jpeg,
    "empty.jpg": lambda: b"",
    "text.jpg": lambda: b"hello, I am not an image\n" * 10,
    "badcrc.png": _bad_crc_png,
}


def _save_mode(path, mode):
    if mode == "I;16":
        Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(path)
    elif mode == "CMYK":
        Image.new("CMYK", (32, 32), (10, 20, 30, 0)).save(path, format="JPEG")
    else:
        Image.new(mode, (32, 32)).save(path)


MODES = {
    "L": "l.png",
    "LA": "la.png",
    "P": "p.png",
    "RGBA": "rgba.png",
    "CMYK": "cmyk.jpg",
    "I;16": "i16.png",
}


@pytest.fixture
def hostile_folder(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", train=4, test=2)
    cat = root / "train" / "cat"
    for name, make in BAD.items():
        (cat / name).write_bytes(make())
    for mode, name in MODES.items():
        _save_mode(root / "train" / "dog" / name, mode)
        assert Image.open(root / "train" / "dog" / name).mode == mode
    # A decompression bomb: over the pixel limit (lowered here so the fixture stays small).
    Image.new("L", (64, 64)).save(cat / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    return root


def test_each_bad_file_is_named(hostile_folder):
    split = load_dataset(f"imagefolder:{hostile_folder}")["train"]
    for name in [*BAD, "bomb.png"]:
        with pytest.raises(BadImageError, match=name):
            split.load(split.ids.index(f"cat/{name}"))


def test_skip_bad_records_every_bad_file_and_keeps_every_mode(hostile_folder, tmp_path):
    cfg = ExtractConfig(
        backbone="test-tiny",
        dataset=f"imagefolder:{hostile_folder}",
        out=str(tmp_path / "s.h5"),
        workers=0,
        progress=False,
    )
    with pytest.raises(BadImageError):
        extract(cfg)
    res = extract(ExtractConfig(**{**cfg.__dict__, "skip_bad": True}))
    s = Store(res.path)
    assert sorted(s.skipped("train")) == sorted(f"cat/{n}" for n in [*BAD, "bomb.png"])
    ids = s.load("train", "pooled").ids
    assert all(f"dog/{name}" in ids for name in MODES.values())  # converted to RGB, extracted
    assert np.isfinite(s.load("train", "pooled").features).all()


def test_class_folder_names_must_be_plain(tmp_path):
    root = make_image_folder(tmp_path / "data", train=2, test=1)
    (root / "train" / "cat").rename(root / "train" / "c\\at")
    with pytest.raises(DatasetError, match="not a plain name"):
        load_dataset(f"imagefolder:{root}")


def test_class_folder_symlinked_outside_the_root_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "data", train=2, test=1)
    outside = make_image_folder(tmp_path / "elsewhere", train=2, test=1)
    os.symlink(outside / "train" / "cat", root / "train" / "zebra")
    (root / "test" / "zebra").mkdir()
    with pytest.raises(DatasetError, match="outside the dataset root"):
        load_dataset(f"imagefolder:{root}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_split_folder_symlinked_outside_the_root_is_refused(tmp_path, split):
    root = make_image_folder(tmp_path / "data", train=2, test=1)
    outside = make_image_folder(tmp_path / "elsewhere", train=2, test=1)
    shutil.rmtree(root / split)
    os.symlink(outside / split, root / split)
    with pytest.raises(DatasetError, match=f"{split} is a symlink leading outside"):
        load_dataset(f"imagefolder:{root}")
    # A symlink that stays inside the root is fine.
    os.unlink(root / split)
    (root / "copies").mkdir()
    shutil.copytree(outside / split, root / "copies" / split)
    os.symlink(root / "copies" / split, root / split)
    assert load_dataset(f"imagefolder:{root}")[split].ids[0] == "cat/0000.png"


def _store_like(path, extra):
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "featcache-store/1"
        extra(f)


def test_stores_with_external_links_or_virtual_data_are_refused(tmp_path):
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["data"] = np.arange(4.0)
    _store_like(
        tmp_path / "ext.h5", lambda f: f.__setitem__("train", h5py.ExternalLink(str(secret), "/"))
    )
    with pytest.raises(StoreError, match="external link"):
        Store(tmp_path / "ext.h5")

    def virtual(f):
        layout = h5py.VirtualLayout(shape=(4,), dtype="f8")
        layout[:] = h5py.VirtualSource(str(secret), "data", shape=(4,))
        f.create_virtual_dataset("train/labels", layout)

    _store_like(tmp_path / "vds.h5", virtual)
    with pytest.raises(StoreError, match="virtual"):
        Store(tmp_path / "vds.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="cannot read store"):
        Store(tmp_path / "junk.h5")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_whose_pickle_would_run_code_are_never_unpickled(tmp_path):
    from featcache.backbones import load_backbone

    marker = tmp_path / "pwned"
    for name in ("model.pth", "model.bin", "model.ckpt"):
        torch.save({"x": _RunsCode(marker)}, tmp_path / name)
        with pytest.raises(WeightsError, match="only .safetensors"):
            load_backbone("efficientnet-b0", tmp_path / name)
    # a pickle disguised as safetensors
    torch.save({"x": _RunsCode(marker)}, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_backbone("efficientnet-b0", tmp_path / "model.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"x": _RunsCode(marker)}, run / "encoder.safetensors")
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_backbone("simclr-resnet18", run)
    assert not marker.exists()


def test_nothing_is_read_outside_the_data_root(tmp_path):
    """Opening files is watched: an escaping symlink is refused before any image is opened,
    and without it every image opened lies under the dataset root."""
    root = make_image_folder(tmp_path / "data", train=2, test=1)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    link = root / "train" / "dog" / "zz.png"
    os.symlink(outside, link)
    opened = []
    real_open = Image.open

    def spy(fp, *a, **k):
        opened.append(Path(fp).resolve())
        return real_open(fp, *a, **k)

    def run(name):
        cfg = ExtractConfig(
            backbone="test-tiny",
            dataset=f"imagefolder:{root}",
            out=str(tmp_path / name),
            workers=0,
            progress=False,
        )
        return extract(cfg)

    Image.open = spy
    try:
        with pytest.raises(DatasetError, match="zz.png is a symlink leading outside"):
            run("s.h5")
        assert opened == []  # refused while listing: not one image read
        link.unlink()
        run("t.h5")
    finally:
        Image.open = real_open
    assert len(opened) == 9 and all(p.is_relative_to(root.resolve()) for p in opened)

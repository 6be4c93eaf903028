import os
import pickle

import numpy as np
import pytest
from PIL import Image

from featcache.datasets import balanced_subset, load_dataset
from featcache.errors import BadImageError, DatasetError


def test_imagefolder_lists_splits_classes_and_stable_ids(image_folder):
    splits = load_dataset(f"imagefolder:{image_folder}")
    assert set(splits) == {"train", "test"}
    tr = splits["train"]
    assert tr.class_names == ["cat", "dog", "frog"]
    assert (
        len(tr) == 36 and tr.ids[0] == "cat/0000.png" and tr.labels.tolist()[:13] == [0] * 12 + [1]
    )
    img = tr.load(0)
    assert img.size == (32, 32)


def test_balanced_subset_is_deterministic_and_balanced(image_folder):
    tr = load_dataset(f"imagefolder:{image_folder}")["train"]
    a = balanced_subset(tr, 5, seed=0)
    b = balanced_subset(tr, 5, seed=0)
    c = balanced_subset(tr, 5, seed=1)
    assert a.ids == b.ids and a.ids != c.ids
    assert np.bincount(a.labels).tolist() == [5, 5, 5]
    assert a.ids == sorted(a.ids)  # listing order kept
    with pytest.raises(DatasetError, match="fewer than the 50 per class"):
        balanced_subset(tr, 50, seed=0)


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no train/ or test/"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "e2" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="is empty"):
        load_dataset(f"imagefolder:{tmp_path / 'e2'}")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("mnist")


def test_class_folder_without_images_is_named(image_folder):
    (image_folder / "train" / "cat").rename(image_folder / "cat_backup")
    (image_folder / "train" / "cat").mkdir()
    (image_folder / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"train/cat holds no images"):
        load_dataset(f"imagefolder:{image_folder}")


def test_corrupt_image_error_names_the_file(image_folder):
    bad = image_folder / "train" / "dog" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    tr = load_dataset(f"imagefolder:{image_folder}")["train"]
    i = tr.ids.index("dog/0003.png")
    with pytest.raises(BadImageError, match="0003.png"):
        tr.load(i)


def test_symlink_escaping_the_root_is_refused(image_folder, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, image_folder / "train" / "cat" / "link.png")
    with pytest.raises(DatasetError, match="outside the dataset root"):
        load_dataset(f"imagefolder:{image_folder}")


def _fake_cifar(root, n=20):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return d


def test_cifar10_batches_are_read_as_arrays(tmp_path):
    _fake_cifar(tmp_path)
    splits = load_dataset("cifar10", data_root=tmp_path)
    assert len(splits["train"]) == 100 and len(splits["test"]) == 20
    assert splits["train"].array.shape == (100, 32, 32, 3)
    assert splits["test"].ids[3] == "test/00003"
    assert splits["train"].load(0).size == (32, 32)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/featcache-pwned",))


def test_cifar10_batch_that_would_run_code_is_refused(tmp_path):
    d = _fake_cifar(tmp_path)
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset("cifar10", data_root=tmp_path)

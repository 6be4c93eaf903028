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
        load_dataset("imagenet-21k")


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


def _csv(path, rows, header="path,label,split"):
    path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    return path


def test_csv_with_a_split_column_lists_the_images_relative_to_it(image_folder):
    rows = [(f"train/{c}/000{i}.png", c, "train") for c in ("dog", "cat") for i in range(3)]
    rows += [("test/frog/0000.png", "frog", "train"), ("test/cat/0001.png", "cat", "test")]
    splits = load_dataset(f"csv:{_csv(image_folder / 'list.csv', rows)}")
    train, test = splits["train"], splits["test"]
    assert train.class_names == test.class_names == ["cat", "dog", "frog"]
    assert train.ids[:2] == ["train/dog/0000.png", "train/dog/0001.png"]  # in the file's order
    assert train.labels.tolist() == [1, 1, 1, 0, 0, 0, 2] and test.labels.tolist() == [0]
    assert np.array_equal(
        np.asarray(train.load(0)), np.asarray(Image.open(image_folder / "train/dog/0000.png"))
    )
    assert train.sizes[0] == (image_folder / "train/dog/0000.png").stat().st_size


def test_csv_as_two_files_and_numeric_labels_in_numeric_order(image_folder):
    train = [(f"train/cat/000{i}.png", str(label)) for i, label in enumerate((10, 2, 2))]
    test = [("test/dog/0000.png", "2")]
    a = _csv(image_folder / "train.csv", train, "path,label")
    b = _csv(image_folder / "test.csv", test, "Path,Label")  # header case does not matter
    splits = load_dataset(f"csv:{a},{b}")
    assert splits["train"].class_names == ["2", "10"]
    assert splits["train"].labels.tolist() == [1, 0, 0] and splits["test"].labels.tolist() == [0]


@pytest.mark.parametrize(
    "header, row, message",
    [
        ("path,label", ("train/cat/0000.png", "cat"), r"columns \['label', 'path', 'split'\]"),
        ("path,label,split", ("train/cat/0000.png", "cat", "val"), r"list.csv:2: split 'val'"),
        ("path,label,split", ("/etc/passwd", "cat", "train"), "not a path inside"),
        ("path,label,split", ("../images/train/cat/0000.png", "cat", "train"), "not a path inside"),
        ("path,label,split", ("train/cat/nope.png", "cat", "train"), r"1 listed .*nope.png"),
        ("path,label,split", ("", "cat", "train"), r"list.csv:2: empty path or label"),
    ],
)  # fmt: skip
def test_bad_csv_files_are_clear_errors(image_folder, header, row, message):
    path = _csv(image_folder / "list.csv", [row], header)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"csv:{path}")


def test_csv_test_labels_must_be_known_to_train(image_folder):
    rows = [("train/cat/0000.png", "cat", "train"), ("test/dog/0000.png", "dog", "test")]
    with pytest.raises(DatasetError, match=r"test has labels \['dog'\] that train lacks"):
        load_dataset(f"csv:{_csv(image_folder / 'list.csv', rows)}")


def test_csv_paths_through_a_folder_symlinked_outside_are_refused(image_folder, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "x.png")
    (image_folder / "linked").symlink_to(tmp_path / "elsewhere")
    rows = [("train/cat/0000.png", "cat", "train"), ("linked/x.png", "cat", "train")]
    with pytest.raises(DatasetError, match="symlink leading outside the dataset root"):
        load_dataset(f"csv:{_csv(image_folder / 'list.csv', rows)}")

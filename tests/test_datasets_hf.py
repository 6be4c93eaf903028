"""Hugging Face datasets (``hfds:``, ``hfds-disk:``): a dataset made in the test with
``Dataset.from_dict(...).cast_column("image", Image())`` from an image folder's files reads as
the folder reads and extracts to its features; parquet folders, columns, split names."""

import sys

import numpy as np
import pytest
from conftest import make_image_folder, tiny_config

from featcache.datasets import load_dataset
from featcache.errors import DatasetError
from featcache.extraction.extract import extract
from featcache.store import Store

datasets = pytest.importorskip("datasets")


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "images", train=5, test=3)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """datasets' cache (parquet folders are converted there) inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _dataset_dict(folder, label_feature=True):
    """The folder's images, in its listing order, as a DatasetDict of image files."""
    from datasets import ClassLabel, Dataset, DatasetDict, Image

    ref = load_dataset(f"imagefolder:{folder}")
    out = {}
    for split, s in ref.items():
        ds = Dataset.from_dict(
            {"image": [str(s.root / i) for i in s.ids], "label": s.labels.tolist()}
        ).cast_column("image", Image())
        if label_feature:
            ds = ds.cast_column("label", ClassLabel(names=s.class_names))
        out[split] = ds
    return DatasetDict(out), ref


def test_a_saved_dataset_reads_as_its_image_folder_with_classlabel_names(folder, tmp_path):
    dd, ref = _dataset_dict(folder)
    dd.save_to_disk(tmp_path / "saved")  # the images' bytes go into the Arrow files
    ours = load_dataset(f"hfds-disk:{tmp_path / 'saved'}")
    assert sorted(ours) == ["test", "train"]
    for name, split in ours.items():
        assert split.class_names == ["cat", "dog", "frog"]
        width = len(str(len(split) - 1))  # 15 training rows: train/00 .. train/14
        assert split.ids == [f"{name}/{i:0{width}d}" for i in range(len(split))]
        np.testing.assert_array_equal(split.labels, ref[name].labels)
        assert split.sizes == ref[name].sizes  # the files' bytes, as the identity digests
        for i in range(len(split)):
            assert np.array_equal(np.asarray(split.load(i)), np.asarray(ref[name].load(i)))


def test_a_saved_dataset_extracts_to_the_folders_features(folder, tmp_path):
    dd, _ = _dataset_dict(folder)
    dd.save_to_disk(tmp_path / "saved")
    a = Store(extract(tiny_config(f"hfds-disk:{tmp_path / 'saved'}", tmp_path / "a.h5")).path)
    b = Store(extract(tiny_config(f"imagefolder:{folder}", tmp_path / "b.h5")).path)
    assert a.info()["fields"]["dataset"]["kind"] == "hfds-disk"
    for split in ("train", "test"):
        x, y = a.load(split, "pooled"), b.load(split, "pooled")
        np.testing.assert_array_equal(x.features, y.features)
        np.testing.assert_array_equal(x.labels, y.labels)


def test_a_parquet_folder_loads_offline_and_splits_map_by_name(folder, tmp_path):
    dd, ref = _dataset_dict(folder)
    for split, ds in dd.items():  # as a Hub repo lays its parquet files out
        ds.to_parquet(tmp_path / "pq" / f"{'validation' if split == 'test' else split}.parquet")
    with pytest.raises(DatasetError, match=r"has no 'test' split \(it has: \['train'"):
        extract(tiny_config(f"hfds:{tmp_path / 'pq'}", tmp_path / "s.h5"))
    cfg = tiny_config(
        f"hfds:{tmp_path / 'pq'}", tmp_path / "s.h5", splits=("train", "test=validation")
    )
    store = Store(extract(cfg).path)
    test = store.load("test", "pooled")
    assert test.ids[0] == "validation/0" and test.labels.tolist() == ref["test"].labels.tolist()
    assert store.class_names == ["cat", "dog", "frog"]


def test_columns_are_chosen_by_option_and_text_labels_become_classes(folder, tmp_path):
    dd, ref = _dataset_dict(folder, label_feature=False)
    dd = dd.rename_columns({"image": "photo"})
    dd = dd.map(lambda row: {"species": ["cat", "dog", "frog"][row["label"]]})
    dd.save_to_disk(tmp_path / "saved")
    spec = f"hfds-disk:{tmp_path / 'saved'}"
    with pytest.raises(DatasetError, match="has no ClassLabel column .* name one with --label"):
        load_dataset(spec)
    ours = load_dataset(spec, label_column="species")
    assert ours["train"].class_names == ["cat", "dog", "frog"]
    np.testing.assert_array_equal(ours["train"].labels, ref["train"].labels)
    numbers = load_dataset(spec, label_column="label")["train"]
    assert numbers.class_names == ["0", "1", "2"]
    with pytest.raises(DatasetError, match="has no column 'nope'"):
        load_dataset(spec, image_column="nope", label_column="label")
    store = Store(extract(tiny_config(spec, tmp_path / "s.h5", label_column="species")).path)
    assert store.info()["fields"]["dataset"].get("image_column") is None  # found by its type
    assert store.config["label_column"] == "species"


def test_a_text_or_number_label_means_one_class_in_every_split(folder, tmp_path):
    """Without a ClassLabel, the first split's labels are the classes of all (as csv:
    lists): a test split without cats keeps dog as class 1; a label train lacks is refused."""
    dd, ref = _dataset_dict(folder, label_feature=False)
    dd["test"] = dd["test"].filter(lambda row: row["label"] != 0)  # no cat
    dd = dd.map(lambda row: {"species": ["cat", "dog", "frog"][row["label"]]})
    dd.save_to_disk(tmp_path / "saved")
    for column in ("species", "label"):
        splits = load_dataset(f"hfds-disk:{tmp_path / 'saved'}", label_column=column)
        assert splits["test"].class_names == splits["train"].class_names
        assert set(splits["test"].labels.tolist()) == {1, 2}
    dd["test"] = dd["test"].map(lambda row: {"species": "emu"})
    dd.save_to_disk(tmp_path / "emu")
    with pytest.raises(DatasetError, match=r"labels \['emu'\] of 'species' are not among"):
        load_dataset(f"hfds-disk:{tmp_path / 'emu'}", label_column="species")


def test_without_the_datasets_library_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DatasetError, match=r"pip install 'featcache\[hf\]'"):
        load_dataset("hfds:cifar10")


def test_rows_selected_images_kept_as_files_and_missing_labels(folder, tmp_path):
    from datasets import Dataset, Image

    dd, ref = _dataset_dict(folder)
    train = dd["train"].select([4, 0, 2])  # an indices mapping over the Arrow table
    split = _one(train, "train")
    assert split.labels.tolist() == ref["train"].labels[[4, 0, 2]].tolist()
    assert np.array_equal(np.asarray(split.load(0)), np.asarray(ref["train"].load(4)))
    # Images as file paths (no bytes in the table): the files' sizes go into the identity.
    assert split.sizes == [ref["train"].sizes[i] for i in (4, 0, 2)]
    files = [str(ref["test"].root / i) for i in ref["test"].ids[:3]]
    unlabelled = Dataset.from_dict({"image": files, "label": [0, None, 1]}).cast_column(
        "image", Image()
    )
    with pytest.raises(DatasetError, match=r"1 rows have no label in 'label'.*test=validation"):
        _one(unlabelled, "test", label_column="label")


def _one(ds, name, **kw):
    from featcache.datasets.hf import _split

    label = kw.get("label_column", "label")
    return _split(name, ds, "image", label, "test-dataset")

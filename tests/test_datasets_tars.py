"""Webdataset tar shards (``wds:``): made in the test from an image folder, read as the folder
reads, extracted to the folder's features; corrupt, truncated and damaged shards are errors that
name the shard, a broken image inside a good shard is a recorded skip."""

import io
import shutil
import tarfile

import numpy as np
import pytest
from conftest import assert_equal_stores, make_image_folder, make_webdataset, tiny_config

from featcache.datasets import load_dataset
from featcache.datasets.tars import expand_braces
from featcache.errors import BadImageError, DatasetError
from featcache.extraction.extract import extract
from featcache.store import Store


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "images", train=6, test=3)


@pytest.fixture
def shards(folder, tmp_path):
    return make_webdataset(folder, tmp_path / "wds")


def test_shards_list_the_folders_samples_without_decoding_and_load_its_pixels(folder, shards):
    ours = load_dataset(f"wds:{shards}")
    theirs = load_dataset(f"imagefolder:{folder}")
    assert sorted(ours) == ["test", "train"]
    for name, split in ours.items():
        ref = theirs[name]
        assert split.class_names == ["cat", "dog", "frog"]
        # Two training shards, cut round-robin: the same samples, keyed by class and stem.
        by_id = {f"{ref.class_names[y]}_{i.split('/')[1][:-4]}": k
                 for k, (i, y) in enumerate(zip(ref.ids, ref.labels))}  # fmt: skip
        assert sorted(split.ids) == sorted(by_id)
        for k, sid in enumerate(split.ids):
            j = by_id[sid]
            assert split.labels[k] == ref.labels[j]
            assert np.array_equal(np.asarray(split.load(k)), np.asarray(ref.load(j)))
        assert split.sizes == [ref.sizes[by_id[s]] for s in split.ids]  # the identity's sizes


def test_a_webdataset_extracts_to_the_folders_features(folder, shards, tmp_path):
    """The shards hold the folder's files: the same pixels, the same features, image by image."""
    a = extract(tiny_config(f"wds:{shards}", tmp_path / "wds.h5")).path
    b = extract(tiny_config(f"imagefolder:{folder}", tmp_path / "folder.h5")).path
    sa, sb = Store(a), Store(b)
    assert sa.config["dataset"] == f"wds:{shards}"
    assert sa.info()["fields"]["dataset"]["kind"] == "wds"
    for split in ("train", "test"):
        x, y = sa.load(split, "pooled"), sb.load(split, "pooled")
        order = {f"{sb.class_names[lab]}_{i.split('/')[1][:-4]}": k
                 for k, (i, lab) in enumerate(zip(y.ids, y.labels))}  # fmt: skip
        rows = [order[i] for i in x.ids]
        np.testing.assert_array_equal(x.features, y.features[rows])
        np.testing.assert_array_equal(x.labels, y.labels[rows])


def test_brace_patterns_and_named_splits_find_the_same_samples(shards):
    whole = load_dataset(f"wds:{shards}")
    by_folder = load_dataset(f"wds:{shards}/{{train/0,train/1,test/0}}.tar")
    named = load_dataset(f"wds:train={shards}/train/{{0..1}}.tar;test={shards}/test/0.tar")
    for other in (by_folder, named):
        assert {k: v.ids for k, v in other.items()} == {k: v.ids for k, v in whole.items()}
        assert other["train"].class_names == ["cat", "dog", "frog"]  # classnames.txt one up
    # As the braceexpand package (webdataset's) expands them.
    assert expand_braces("s/train-{008..011}.tar") == [f"s/train-{i:03d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("s-{1..010}") == [f"s-{i:03d}" for i in range(1, 11)]  # padded
    assert expand_braces("s{3..1}") == ["s3", "s2", "s1"]  # descending
    assert expand_braces("{a,{b,c}}x") == ["ax", "bx", "cx"]  # nested
    assert expand_braces("x{y}z") == ["x{y}z"]  # neither: as written


def test_a_pattern_whose_split_cannot_be_told_or_with_missing_shards_is_refused(shards, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(shards / "train" / "0.tar", loose / "shard-0.tar")
    with pytest.raises(DatasetError, match="cannot tell the split of .*shard-0.tar"):
        load_dataset(f"wds:{loose}/shard-{{0..0}}.tar")
    with pytest.raises(DatasetError, match=r"1 of 3 shards do not exist \(e.g. .*2.tar\)"):
        load_dataset(f"wds:{shards}/train/{{0..2}}.tar")


def _add(tar_path, name, data):
    with tarfile.open(tar_path, "a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_a_corrupt_truncated_or_damaged_shard_is_an_error_naming_it(shards):
    third = shards / "train" / "2.tar"
    third.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError, match=f"shard {third} is not a readable tar file"):
        load_dataset(f"wds:{shards}")
    third.unlink()
    second = shards / "train" / "1.tar"
    good = second.read_bytes()
    second.write_bytes(good[: len(good) // 2])  # a copy cut short
    with pytest.raises(DatasetError, match=f"shard {second} is (truncated|corrupt)"):
        load_dataset(f"wds:{shards}")
    second.write_bytes(good)
    with tarfile.open(second) as tar:
        header = tar.getmembers()[2].offset  # the second sample's first header
    second.write_bytes(good[:header])  # cut exactly between two samples
    with pytest.raises(DatasetError, match=f"shard {second} is truncated: it ends without"):
        load_dataset(f"wds:{shards}")
    damaged = bytearray(good)
    damaged[header + 100 : header + 108] = b"garbage!"  # its mode field: a bad checksum
    second.write_bytes(bytes(damaged))  # tarfile alone would stop there without a word
    with pytest.raises(DatasetError, match=f"shard {second} is corrupt: a damaged tar header"):
        load_dataset(f"wds:{shards}")


def test_samples_without_image_or_label_and_keys_twice_are_refused(shards, tmp_path):
    shard = shards / "test" / "0.tar"
    _add(shard, "lonely.txt", b"no image")
    with pytest.raises(DatasetError, match="sample 'lonely' in shard .*0.tar has \\['txt'\\]"):
        load_dataset(f"wds:{shards}")
    shutil.copy(shards / "train" / "0.tar", shard)  # train/0.tar's keys in test twice
    shutil.copy(shards / "train" / "0.tar", shards / "test" / "1.tar")
    with pytest.raises(DatasetError, match="appears twice in the test split"):
        load_dataset(f"wds:{shards}")


def test_an_entry_twice_in_a_sample_and_blank_class_names_are_refused(shards):
    _add(shards / "test" / "0.tar", "zz.png", (shards / "test" / "0.tar").read_bytes()[:10])
    _add(shards / "test" / "0.tar", "zz.cls", b"0")
    _add(shards / "test" / "0.tar", "zz.cls", b"1")
    with pytest.raises(DatasetError, match=r"holds zz.cls twice in sample 'zz'"):
        load_dataset(f"wds:{shards}")
    (shards / "classnames.txt").write_text("cat\n\ndog\nfrog\n\n")
    with pytest.raises(DatasetError, match="classnames.txt: one class name a line.*blank line 2"):
        load_dataset(f"wds:{shards}", splits=("train",))


def test_a_broken_image_in_a_good_shard_names_it_and_is_a_recorded_skip(shards, tmp_path):
    _add(shards / "test" / "0.tar", "zz_broken.jpg", b"not a jpeg")
    _add(shards / "test" / "0.tar", "zz_broken.cls", b"1")
    split = load_dataset(f"wds:{shards}", splits=("test",))["test"]
    with pytest.raises(BadImageError, match=r"0.tar:zz_broken.jpg"):
        split.load(split.ids.index("zz_broken"))
    result = extract(tiny_config(f"wds:{shards}", tmp_path / "s.h5", skip_bad=True))
    assert result.skipped == {"train": [], "test": ["zz_broken"]}
    assert "zz_broken" not in Store(result.path).load("test", "pooled").ids


def test_class_balanced_subsets_of_a_webdataset_are_those_of_its_ids(shards, tmp_path):
    store = Store(extract(tiny_config(f"wds:{shards}", tmp_path / "s.h5", train_per_class=2)).path)
    train = store.load("train", "pooled")
    assert len(train.ids) == 6 and np.bincount(train.labels).tolist() == [2, 2, 2]
    again = extract(tiny_config(f"wds:{shards}", tmp_path / "s.h5", train_per_class=2))
    assert again.images == 0  # the same fingerprint: nothing to do
    assert_equal_stores(store.path, again.path)


def test_the_command_line_names_shards_by_split_patterns_and_lists_the_kind(shards, tmp_path):
    from click.testing import CliRunner

    from featcache.cli import main

    runner = CliRunner()
    patterns = f"train={shards}/train/{{0..1}}.tar;test={shards}/test/0.tar"
    args = ["extract", "--backbone", "test-tiny", "--out", tmp_path / "s.h5", "--workers", "0"]
    r = runner.invoke(main, [*map(str, args), "--dataset", "wds", "--split-patterns", patterns])
    assert r.exit_code == 0, r.output
    assert Store(tmp_path / "s.h5").config["dataset"] == f"wds:{patterns}"
    r = runner.invoke(main, [*map(str, args), "--dataset", "cifar10", "--split-patterns", patterns])
    assert r.exit_code == 2 and "goes with --dataset wds" in r.output
    listing = runner.invoke(main, ["datasets"]).output
    assert "wds:DIR" in listing and "wds:train=PATTERN;test=PATTERN" in listing
    assert "hfds:NAME[:CONFIG]" in listing and "hfds-disk:DIR" in listing

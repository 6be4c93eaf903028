"""Extraction into stores: layout, fingerprint refusal, resume after kill -9, bad input."""

import json
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_equal_stores, make_image_folder, start, tiny_extract

from featcache.errors import BadImageError, SpecMismatchError, StoreError
from featcache.extraction.extract import ExtractConfig, extract
from featcache.store import ShardedWriter, SplitLayout, Store


def _cfg(folder, out, **kw):
    base = dict(
        backbone="test-tiny",
        dataset=f"imagefolder:{folder}",
        out=str(out),
        workers=0,
        batch_size=4,
        shard_size=8,
        progress=False,
    )
    return ExtractConfig(**{**base, **kw})


def test_store_is_plain_hdf5_with_metadata(image_folder, tmp_path):
    res = extract(_cfg(image_folder, tmp_path / "s.h5"))
    assert res.images == 48 and res.path.exists()
    assert not (tmp_path / "s.h5.parts").exists()
    with h5py.File(res.path, "r") as f:  # plain h5py, no featcache needed
        assert f["train/features/pooled"].shape == (36, 16)
        assert f["train/features/maxpool"].shape == (36, 16)
        assert f["test/labels"][:].tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert f["test/ids"][0].decode() == "cat/0000.png"
        assert json.loads(f.attrs["class_names"]) == ["cat", "dog", "frog"]
        fields = json.loads(f.attrs["fields"])
        assert fields["backbone"]["name"] == "test-tiny"
        assert set(fields) >= {"weights", "preprocess", "dataset", "subset", "precision"}
        assert len(f.attrs["fingerprint"]) == 64
        assert json.loads(f.attrs["config"])["dataset"].startswith("imagefolder:")
    s = Store(res.path)
    assert s.sizes == {"train": 36, "test": 12} and s.default_feature() == "pooled"


def test_features_do_not_depend_on_batch_size_or_workers(image_folder, tmp_path):
    a = extract(_cfg(image_folder, tmp_path / "a.h5", batch_size=5))
    b = extract(_cfg(image_folder, tmp_path / "b.h5", batch_size=16, workers=1))
    fa = Store(a.path).load("train", "pooled").features
    fb = Store(b.path).load("train", "pooled").features
    np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-6)


def test_subset_and_rerun_is_a_no_op(image_folder, tmp_path):
    cfg = _cfg(image_folder, tmp_path / "s.h5", train_per_class=5, test_per_class=2)
    first = extract(cfg)
    assert Store(first.path).sizes == {"train": 15, "test": 6}
    again = extract(cfg)
    assert again.images == 0 and again.resumed_images == 0


def test_a_work_folder_left_beside_a_finished_store_is_removed_by_the_rerun(image_folder, tmp_path):
    # A kill between publishing the store and removing its work folder leaves the folder.
    cfg = _cfg(image_folder, tmp_path / "s.h5", train_per_class=2, test_per_class=1)
    extract(cfg)
    parts = tmp_path / "s.h5.parts"
    parts.mkdir()
    (parts / "store.h5").write_bytes(b"\0" * 4096)
    (parts / "train-000000.done").touch()
    assert extract(cfg).images == 0 and not parts.exists()
    busy = ShardedWriter(parts.parent / "t.h5", {"x": 1})  # held by a writer: kept
    busy.parts.mkdir()
    busy._take_lock((busy.parts / "lock").resolve())
    try:
        ShardedWriter(busy.out, {"x": 1})._remove_leftover_parts()
        assert busy.parts.exists()
    finally:
        busy.close()


def test_other_spec_is_refused_naming_the_field_unless_overwrite(image_folder, tmp_path):
    out = tmp_path / "s.h5"
    extract(_cfg(image_folder, out, train_per_class=5, test_per_class=2))
    before = out.read_bytes()
    with pytest.raises(SpecMismatchError, match="field 'subset' differs"):
        extract(_cfg(image_folder, out, train_per_class=6, test_per_class=2))
    assert out.read_bytes() == before  # nothing lost
    res = extract(_cfg(image_folder, out, train_per_class=6, test_per_class=2, overwrite=True))
    assert Store(res.path).sizes["train"] == 18


FIELDS = (
    "feature_version",
    "backbone",
    "weights",
    "preprocess",
    "precision",
    "views",
    "subset",
    "dataset",
)


def _change(field: str, monkeypatch, folder, tmp_path) -> dict:
    """Change the one thing behind ``field``; returns the changed run's config keywords."""
    from dataclasses import replace

    from tiny_backbone import TINY

    from featcache.backbones import registry
    from featcache.extraction import extract

    if field == "feature_version":  # the code's features changed
        monkeypatch.setattr(extract, "FEATURE_VERSION", extract.FEATURE_VERSION + 1)
    elif field == "backbone":
        monkeypatch.setitem(registry._REGISTRY, "test-tiny-2", replace(TINY, name="test-tiny-2"))
        return {"backbone": "test-tiny-2"}
    elif field == "weights":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(1)}, tmp_path / "w.safetensors")
        return {"weights": str(tmp_path / "w.safetensors")}
    elif field == "preprocess":  # the registry entry's normalisation changed
        monkeypatch.setitem(registry._REGISTRY, "test-tiny", replace(TINY, mean=(0.4,) * 3))
    elif field == "precision":
        return {"precision": "bf16"}
    elif field == "views":
        return {"views": 2}
    elif field == "subset":
        return {"train_per_class": 11}
    elif field == "dataset":  # an image renamed: same count, same sizes
        (folder / "train" / "cat" / "0000.png").rename(folder / "train" / "cat" / "0100.png")
    return {}


@pytest.mark.parametrize("field", FIELDS)
def test_a_store_of_another_spec_is_refused_naming_the_field(
    field, image_folder, tmp_path, monkeypatch
):
    out = tmp_path / "s.h5"
    extract(_cfg(image_folder, out))
    before = out.read_bytes()
    changed = _change(field, monkeypatch, image_folder, tmp_path)
    with pytest.raises(SpecMismatchError, match=f"already exists .*field '{field}' differs"):
        extract(_cfg(image_folder, out, **changed))
    assert out.read_bytes() == before  # nothing lost


@pytest.mark.parametrize("field", FIELDS)
def test_partial_work_of_another_spec_is_refused_naming_the_field(
    field, image_folder, tmp_path, monkeypatch
):
    import tiny_backbone

    out = tmp_path / "s.h5"
    monkeypatch.setattr(tiny_backbone, "FAIL_AFTER", 5)  # crashes after shards 0 and 1
    with pytest.raises(RuntimeError, match="injected"):
        extract(_cfg(image_folder, out))
    monkeypatch.setattr(tiny_backbone, "FAIL_AFTER", None)
    shards = sorted((tmp_path / "s.h5.parts").glob("*.h5"))
    changed = _change(field, monkeypatch, image_folder, tmp_path)
    with pytest.raises(SpecMismatchError, match=f"partial extraction .*field '{field}' differs"):
        extract(_cfg(image_folder, out, **changed))
    assert sorted((tmp_path / "s.h5.parts").glob("*.h5")) == shards  # nothing lost


def test_a_store_recorded_before_fields_carried_their_version_is_still_complete(
    image_folder, tmp_path
):
    """Fields then lacked feature_version, which the hash added: the fingerprint is the same."""
    out = tmp_path / "s.h5"
    extract(_cfg(image_folder, out))
    with h5py.File(out, "r+") as f:
        fields = json.loads(f.attrs["fields"])
        assert fields.pop("feature_version") == 1
        f.attrs["fields"] = json.dumps(fields, sort_keys=True)
    assert extract(_cfg(image_folder, out)).images == 0


def test_missing_out_directory_is_a_clear_error(image_folder, tmp_path):
    from featcache.errors import OutputError

    with pytest.raises(OutputError, match="does not exist; create it first"):
        extract(_cfg(image_folder, tmp_path / "no" / "s.h5"))


def test_corrupt_image_names_the_file_or_is_skipped(image_folder, tmp_path):
    bad = image_folder / "train" / "dog" / "0002.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(BadImageError, match="dog/0002.png"):
        extract(_cfg(image_folder, tmp_path / "s.h5"))
    res = extract(_cfg(image_folder, tmp_path / "s.h5", skip_bad=True))
    s = Store(res.path)
    assert s.sizes["train"] == 35 and s.skipped("train") == ["dog/0002.png"]
    assert "dog/0002.png" not in s.load("train", "pooled").ids


def test_an_unreadable_image_decoded_by_a_loader_worker_comes_back_named(image_folder, tmp_path):
    """Decoding errors travel back from worker processes as values: the same clear error (or
    the same recorded skip) as when the process decodes itself."""
    bad = image_folder / "test" / "frog" / "0001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(BadImageError, match="frog/0001.png"):
        extract(_cfg(image_folder, tmp_path / "s.h5", workers=2))
    with_workers = extract(_cfg(image_folder, tmp_path / "w.h5", workers=2, skip_bad=True))
    in_process = extract(_cfg(image_folder, tmp_path / "p.h5", workers=0, skip_bad=True))
    skipped = {"train": [], "test": ["frog/0001.png"]}
    assert with_workers.skipped == in_process.skipped == skipped
    assert Store(with_workers.path).skipped("test") == ["frog/0001.png"]
    assert_equal_stores(with_workers.path, in_process.path)


def test_crash_then_rerun_resumes_from_shards_with_equal_features(image_folder, tmp_path):
    import tiny_backbone

    full = extract(_cfg(image_folder, tmp_path / "full.h5"))
    out = tmp_path / "s.h5"
    tiny_backbone.FAIL_AFTER = 5  # the 6th batch raises: shards 0 and 1 (8 images each) are done
    try:
        with pytest.raises(RuntimeError, match="injected"):
            extract(_cfg(image_folder, out))
    finally:
        tiny_backbone.FAIL_AFTER = None
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "s.h5.parts").glob("*.done")) == [
        "train-000000.done",
        "train-000001.done",
    ]
    res = extract(_cfg(image_folder, out))
    assert res.resumed_images == 16 and res.images == 32
    for split in ("train", "test"):
        a, b = Store(out).load(split, "pooled"), Store(full.path).load(split, "pooled")
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.features, b.features)


def test_kill_9_midway_then_rerun_resumes_with_equal_features(image_folder, tmp_path):
    def cmd(out):
        return tiny_extract(image_folder, out, "--batch-size", 4, "--shard-size", 8)

    ref = start(cmd(tmp_path / "ref.h5"))
    assert ref.wait(120) == 0, ref.stdout.read()

    out = tmp_path / "s.h5"
    parts = tmp_path / "s.h5.parts"
    p = start(cmd(out), FEATCACHE_TEST_DELAY="0.15")
    deadline = time.time() + 120
    while len(list(parts.glob("train-*.done"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = sorted(x.name for x in parts.glob("*.done"))
    assert 2 <= len(done) < 6 and not out.exists()  # killed midway, store not there yet

    rerun = start(cmd(out))
    log = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == 0, log
    assert f"{len(done) * 8} resumed from shards" in log
    assert_equal_stores(out, tmp_path / "ref.h5")


def _children(pid: int) -> list[int]:
    return [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_9_with_its_loader_worker_then_an_immediate_rerun_completes(tmp_path):
    """As a user would: the real CLI and a loader worker, which outlives its killed parent by
    seconds and must not hold the store's lock meanwhile."""
    images = make_image_folder(tmp_path / "images", train=40, test=8)

    def cmd(out):
        return tiny_extract(images, out, "--batch-size", 4, "--shard-size", 8, "--workers", 1)

    out, parts = tmp_path / "s.h5", tmp_path / "s.h5.parts"
    p = start(cmd(out), FEATCACHE_TEST_DELAY="0.1")  # a batch a tenth of a second: killed midway
    deadline = time.time() + 300
    while len(list(parts.glob("train-*.done"))) < 2 and time.time() < deadline:
        time.sleep(0.02)
    workers = _children(p.pid)
    assert workers, "no loader worker: the test would prove nothing"
    for w in workers:  # held still, so that they outlive their parent for sure
        os.kill(w, signal.SIGSTOP)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # At once, as the rerun will: the lock must have died with the process that took it.
    writer = ShardedWriter(out, json.loads((parts / "spec.json").read_text()))
    try:
        assert all(_alive(w) for w in workers)
        writer.begin()
    finally:
        writer.close()
        for w in workers:
            os.kill(w, signal.SIGKILL)
    done = len(list(parts.glob("*.done")))
    assert 2 <= done < 18 and not out.exists()  # killed midway: 15 train and 3 test shards
    rerun = start(cmd(out))
    log = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, log
    assert f"{done * 8} resumed from shards" in log
    ref = start(cmd(tmp_path / "ref.h5"))
    assert ref.wait(300) == 0, ref.stdout.read()
    assert_equal_stores(out, tmp_path / "ref.h5")


def test_second_extraction_into_the_same_store_is_refused(image_folder, tmp_path):
    args = tiny_extract(image_folder, tmp_path / "s.h5", "--batch-size", 2)
    hold = tmp_path / "hold"
    hold.touch()  # the first extraction waits at its first batch until the second is refused
    first = start(args, FEATCACHE_TEST_HOLD=str(hold))
    parts = tmp_path / "s.h5.parts"
    deadline = time.time() + 60
    while not (parts / "spec.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = start(args)
    log = second.communicate(timeout=120)[0]
    hold.unlink()
    assert second.returncode == 1 and "another featcache extraction is writing" in log
    assert first.wait(120) == 0
    assert Store(tmp_path / "s.h5").sizes == {"train": 36, "test": 12}


LAYOUT = {"train": SplitLayout(rows=1, id_bytes=1, arrays={"features/x": (2,)})}


def test_a_failed_begin_does_not_keep_the_store_busy(tmp_path, monkeypatch):
    from featcache import io

    def full(*args, **kwargs):
        raise StoreError("disk full while writing the file spec.json")

    monkeypatch.setattr(io, "write_atomic", full)
    with pytest.raises(StoreError, match="disk full"):
        ShardedWriter(tmp_path / "s.h5", {"spec": 1}).begin(LAYOUT)
    monkeypatch.undo()
    writer = ShardedWriter(tmp_path / "s.h5", {"spec": 1})
    writer.begin(LAYOUT)  # not "another featcache extraction is writing"
    writer.close()


def test_fields_without_a_feature_version_resume_their_own_partial_work(tmp_path):
    """An API caller's fields need not carry it: they are version 1, written and read."""
    first = ShardedWriter(tmp_path / "s.h5", {"spec": 1})
    first.begin(LAYOUT, {"class_names": ["a"]})
    first.write_shard("train", 0, 0, ["a"], [0], {"features/x": np.ones((1, 2))}, [], 0.1)
    first.close()  # as after a crash
    again = ShardedWriter(tmp_path / "s.h5", {"spec": 1})
    again.begin(LAYOUT)
    assert again.has_shard("train", 0, range(0, 1))
    again.assemble({"train": [range(0, 1)]}, {})
    assert Store(tmp_path / "s.h5").read("train", "ids").tolist() == ["a"]
    np.testing.assert_array_equal(Store(tmp_path / "s.h5").load("train", "x").features, 1)


def test_a_second_writer_in_the_same_process_is_refused_until_the_first_closes(tmp_path):
    first = ShardedWriter(tmp_path / "s.h5", {"spec": 1})
    first.begin(LAYOUT)
    try:
        with pytest.raises(StoreError, match="another featcache extraction is writing"):
            ShardedWriter(tmp_path / "s.h5", {"spec": 1}).begin(LAYOUT)
    finally:
        first.close()
    again = ShardedWriter(tmp_path / "s.h5", {"spec": 1})
    again.begin(LAYOUT)
    again.close()


def test_augmented_views_are_cached_for_train_only_and_resume_exactly(image_folder, tmp_path):
    import tiny_backbone

    full = extract(_cfg(image_folder, tmp_path / "full.h5", views=3))
    s = Store(full.path)
    assert s.num_views == 3
    views = s.load_views("train", "pooled")
    clean = s.load("train", "pooled").features
    assert views.shape == (36, 2, 16) and s.load_views("test", "pooled") is None
    assert not np.allclose(views[:, 0], clean) and not np.allclose(views[:, 0], views[:, 1])
    assert Store(extract(_cfg(image_folder, tmp_path / "v1.h5")).path).fingerprint != s.fingerprint

    out = tmp_path / "s.h5"
    tiny_backbone.FAIL_AFTER = 7  # 3 forwards per train batch: crashes inside shard 1
    try:
        with pytest.raises(RuntimeError, match="injected"):
            extract(_cfg(image_folder, out, views=3))
    finally:
        tiny_backbone.FAIL_AFTER = None
    res = extract(_cfg(image_folder, out, views=3))
    assert res.resumed_images == 8
    np.testing.assert_array_equal(Store(out).load_views("train", "pooled"), views)


def _lite0_test_split(folder, out, **kw):
    """Features of efficientnet-lite0 over the test split of an image folder."""
    cfg = dict(
        backbone="efficientnet-lite0",
        dataset=f"imagefolder:{folder}",
        out=str(out),
        splits=("test",),
        workers=0,
        progress=False,
    )
    res = extract(ExtractConfig(**{**cfg, **kw}))
    return Store(res.path).load("test", "pooled").features


def test_frozen_cnn_gives_the_eager_features(image_folder, tmp_path):
    kw = dict(test_per_class=2, precision="fp32")
    a = _lite0_test_split(image_folder, tmp_path / "f.h5", **kw)
    b = _lite0_test_split(image_folder, tmp_path / "e.h5", freeze=False, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_frozen_cnn_in_bf16_stays_close_to_fp32(cifar_dir, tmp_path):
    """BatchNorm is folded in fp32 before autocast rounds the weights (real CIFAR images)."""

    def features(name, **kw):
        x = _lite0_test_split(cifar_dir, tmp_path / f"{name}.h5", test_per_class=5, **kw)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ref = features("fp32", precision="fp32")
    frozen = (features("bf16", precision="bf16") * ref).sum(1)
    eager = (features("bf16-eager", precision="bf16", freeze=False) * ref).sum(1)
    # Traced under autocast (folding into rounded weights), the mean was 0.9940 on CIFAR.
    assert frozen.mean() > 0.9965, (frozen.mean(), eager.mean())
    assert frozen.mean() >= eager.mean() - 1e-3


def test_compiled_backbone_gives_the_eager_features_with_one_graph(image_folder, tmp_path):
    import torch._dynamo

    eager = extract(_cfg(image_folder, tmp_path / "e.h5", batch_size=5))
    torch._dynamo.reset()
    # Shards of 8 in batches of 5 leave batches of 3 (and the test split's 12 -> 5, 3, 4):
    # padded, they must not make dynamo compile a second graph.
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = extract(_cfg(image_folder, tmp_path / "c.h5", batch_size=5, compile=True))
    for split in ("train", "test"):
        a = Store(eager.path).load(split, "pooled")
        b = Store(compiled.path).load(split, "pooled")
        assert list(a.ids) == list(b.ids)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-5)

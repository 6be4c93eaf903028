"""featcache export: the files read back with numpy and pyarrow hold the store's features,
ids and labels exactly, in the stored dtype unless widened."""

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from featcache.cli import main
from featcache.errors import OutputError
from featcache.extraction.extract import extract
from featcache.store import Store

pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from conftest import make_image_folder, tiny_config

    root = tmp_path_factory.mktemp("export")
    folder = make_image_folder(root / "images", train=5, test=3)
    out = {}
    for dtype in ("float32", "float16"):
        out[dtype] = extract(tiny_config(folder, root / f"{dtype}.h5", dtype=dtype)).path
    return out


def _stored(store, split, feature):
    with h5py.File(store, "r") as f:
        return f[split]["features"][feature][:]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Rows are copied 4 at a time: chunk and shard boundaries fall everywhere."""
    import featcache.store.export as export

    monkeypatch.setattr(export, "_CHUNK", 4)


def test_npy_per_split_and_feature_set_reads_back_exactly(stores, tmp_path):
    store = Store(stores["float16"])
    out = featcache.export(store, tmp_path / "npy")
    assert (out / "class_names.txt").read_text().split() == store.class_names
    for split in ("train", "test"):
        ids = (out / split / "ids.txt").read_text().splitlines()
        assert ids == list(store.read(split, "ids"))
        np.testing.assert_array_equal(
            np.load(out / split / "labels.npy"), store.read(split, "labels")
        )
        for feature in store.feature_sets:  # every set by default
            x = np.load(out / split / f"{feature}.npy")
            assert x.dtype == np.float16  # as stored
            np.testing.assert_array_equal(x, _stored(store.path, split, feature))
    wide = featcache.export(store, tmp_path / "wide", dtype="float32", features=["pooled"])
    x = np.load(wide / "test" / "pooled.npy")
    assert x.dtype == np.float32 and sorted(p.name for p in (wide / "test").iterdir()) == [
        "ids.txt", "labels.npy", "pooled.npy",
    ]  # fmt: skip
    np.testing.assert_array_equal(x, store.load("test", "pooled").features)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_clip_retrievals_layout_in_shards_reads_back_exactly(stores, tmp_path, dtype):
    store = Store(stores[dtype])
    out = featcache.export(store, tmp_path / "cr", format="parquet", shard_size=7)
    n = sum(store.sizes.values())  # 15 train + 9 test rows: shards of 7, 7, 7, 3
    files = sorted((out / "img_emb").iterdir(), key=lambda p: int(p.stem.split("_")[-1]))
    assert [p.name for p in files] == [f"img_emb_{k}.npy" for k in range(4)]
    emb = np.concatenate([np.load(p) for p in files])
    assert emb.dtype == np.dtype(dtype)  # float16 stays float16
    meta = [pq.read_table(out / "metadata" / f"metadata_{k}.parquet") for k in range(4)]
    assert [len(m) for m in meta] == [len(np.load(p)) for p in files] == [7, 7, 7, 3]
    rows = {k: sum((m.column(k).to_pylist() for m in meta), []) for k in meta[0].column_names}
    assert sorted(rows) == ["class_name", "id", "label", "split"] and len(emb) == n
    feature = store.default_feature()
    at = 0
    for split in ("train", "test"):
        size = store.sizes[split]
        part = slice(at, at + size)
        np.testing.assert_array_equal(emb[part], _stored(store.path, split, feature))
        assert rows["id"][part] == list(store.read(split, "ids"))
        assert rows["label"][part] == store.read(split, "labels").tolist()
        assert rows["class_name"][part] == [store.class_names[y] for y in rows["label"][part]]
        assert rows["split"][part] == [split] * size
        at += size
    both = featcache.export(store, tmp_path / "both", format="parquet", features=["all"])
    assert sorted(p.name for p in both.iterdir()) == sorted(store.feature_sets)
    assert (both / "maxpool" / "metadata" / "metadata_0.parquet").is_file()


def test_a_folder_with_files_is_kept_unless_overwritten_and_the_cli_writes_the_same(
    stores, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="is not empty; pass --overwrite"):
        featcache.export(stores["float32"], out)
    assert (out / "mine.txt").read_text() == "keep me"
    r = CliRunner().invoke(main, ["export", str(stores["float32"]), "--out", str(out)])
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = CliRunner().invoke(
        main, ["export", str(stores["float32"]), "--out", str(out), "--overwrite",
               "--features", "pooled"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert not (out / "mine.txt").exists()
    np.testing.assert_array_equal(
        np.load(out / "train" / "pooled.npy"), _stored(stores["float32"], "train", "pooled")
    )
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left

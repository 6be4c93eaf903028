"""Stores larger than memory: float16 stores and the k-NN with bounded memory."""

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image_folder, tiny_extract_args

import featcache
from featcache.cli import main
from featcache.io import parse_size


def _run(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r.output


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("large") / "images", train=30, test=10)


@pytest.fixture(scope="module")
def store(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s.h5"
    _run(*tiny_extract_args(folder, out))
    return out


@pytest.mark.parametrize("budget", ["600", "3KiB", "1GiB"])  # a row is 4 x 16 bytes wide
def test_bounded_knn_equals_the_in_memory_knn(store, budget):
    in_memory = featcache.knn(store, k=(1, 5, 20)).to_dict()
    bounded = featcache.knn(store, k=(1, 5, 20), max_memory=budget).to_dict()
    assert bounded["results"] == in_memory["results"]
    assert bounded["config"]["max_memory"] == parse_size(budget)


def test_bounded_knn_merges_chunks_like_one_search():
    """Random features, chunks of 7 training rows: the same neighbours as one faiss search,
    for all the queries and for a rank's share of them."""
    from featcache.evaluation.data import Splits
    from featcache.evaluation.knn import KnnConfig, l2_normalize, neighbours_bounded, search

    rng = np.random.default_rng(0)
    xtr, xte = (
        rng.normal(size=(100, 8)).astype(np.float32),
        rng.normal(size=(40, 8)).astype(np.float32),
    )
    data = Splits.in_memory((xtr, np.zeros(100, int)), (xte, np.zeros(40, int)))
    cfg = KnnConfig(k=(1, 3, 7), max_memory=2 * 4 * 8 * 7)  # 7 training rows a chunk
    want_s, want_i = search(l2_normalize(xtr), l2_normalize(xte), 7)
    for share in (slice(0, 40), slice(13, 29), slice(40, 40)):
        sims, idx = neighbours_bounded(data, cfg, share)
        np.testing.assert_array_equal(idx, want_i[share])
        np.testing.assert_allclose(sims, want_s[share], rtol=0, atol=1e-6)


def test_float16_stores_halve_the_features_and_every_command_reads_them(store, folder, tmp_path):
    half = tmp_path / "half.h5"
    _run(*tiny_extract_args(folder, half, "--dtype", "float16"))
    with h5py.File(half) as f, h5py.File(store) as g:
        assert f["train/features/pooled"].dtype == np.float16
        assert g["train/features/pooled"].dtype == np.float32
        # The same features, rounded once to float16 when stored.
        assert np.array_equal(
            f["train/features/pooled"][:], g["train/features/pooled"][:].astype(np.float16)
        )
    s = featcache.Store(half)
    x, _, _ = s.features("train")
    assert x.dtype == np.float32  # computed in float32
    assert s.fields["dtype"] == "float16" and "dtype" not in featcache.Store(store).fields
    for command in (["probe", "--epochs", "3"], ["knn", "--k", "5"], ["cluster"], ["retrieval"]):
        out = tmp_path / f"half.{command[0]}.json"
        _run(command[0], "--store", half, *command[1:], "--json", out)
        assert json.loads(out.read_text())["fingerprint"] == s.fingerprint
    _run("knn", "--store", half, "--k", "5", "--max-memory", "1KiB")
    assert "probe top-1" in _run("table", half)
    # The same command with the other dtype onto the same store: refused, naming the field.
    out = _run(*tiny_extract_args(folder, half), code=1)
    assert "field 'dtype' differs" in out


@pytest.mark.parametrize("values_at_once", [2**22, 1, 70])  # the whole, a row, 2 rows of 35
def test_float16_rows_read_as_float32_in_pieces(tmp_path, monkeypatch, values_at_once):
    from featcache import store
    from featcache.store import reader

    monkeypatch.setattr(reader, "_READ_VALUES", values_at_once)
    rng = np.random.default_rng(0)
    half = (rng.normal(size=(101, 5, 7)) * 1e3).astype(np.float16)
    half[0, 0, :4] = [np.inf, -np.inf, 65504, 6e-8]  # the extremes, a subnormal
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["h"], f["s"], f["e"] = half, half.astype(np.float32), half[:0]
        for rows in (slice(None), slice(3, 98), slice(99, 500), slice(7, 7)):
            want = half[rows].astype(np.float32)
            for name in ("h", "s"):
                got = store.as_float32(f[name], rows)
                assert got.dtype == np.float32 and np.array_equal(got, want), (name, rows)
        assert store.as_float32(f["e"]).shape == (0, 5, 7)


def test_sizes_are_read_as_people_write_them():
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("1e6") == 10**6
    with pytest.raises(ValueError, match="cannot read '2 apples' as a size"):
        parse_size("2 apples")
    assert "cannot read 'lots' as a size" in _run("knn", "--store", "x.h5", "--max-memory",
                                                    "lots", code=1)  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """6,000 x 16 training features of 5 classes, in shards of 1,000 rows."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from synthetic import write_synthetic

    path = tmp_path_factory.mktemp("synthetic") / "s.h5"
    return write_synthetic(path, 6000, 6000, 16, 5, shard_rows=1000, separation=0.5)


# One validation split (--max-memory chooses on one; in memory, 6,000 rows would be folds).
PROBE = dict(max_epochs=20, weight_decays=(1e-3, 1e-2, 1e-1), cv_below=0)


def test_a_bounded_probe_lands_within_0_3_points_of_the_in_memory_one(synthetic):
    in_memory = featcache.probe(synthetic, **PROBE)
    assert 60 < in_memory.top1 < 95  # a probe with something to learn
    # A quarter of the training features at once: 15 chunks of 400 rows.
    bounded = featcache.probe(synthetic, max_memory="100KiB", **PROBE)
    assert abs(bounded.top1 - in_memory.top1) <= 0.3
    assert bounded.weight_decay == in_memory.weight_decay
    # A budget that holds the split: one chunk, the in-memory protocol exactly.
    whole = featcache.probe(synthetic, max_memory="1GiB", **PROBE)
    assert (whole.top1, whole.weight_decay, whole.epochs) == (
        in_memory.top1,
        in_memory.weight_decay,
        in_memory.epochs,
    )


def test_the_bounded_probe_from_the_command_line(synthetic, tmp_path):
    out = tmp_path / "p.json"
    _run("probe", "--store", synthetic, "--epochs", "3", "--max-memory", "64KiB", "--json", out)
    result = json.loads(out.read_text())
    assert result["config"]["max_memory"] == 65536 and result["test"]["top1"] > 40
    assert "--max-memory bounds the probe only" in _run(
        "probe", "--store", synthetic, "--shots", "1", "--max-memory", "1GiB", code=2
    )


def test_a_bounded_probe_refuses_features_that_are_not_finite(synthetic, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(synthetic.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["train/features/x"][4321, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite values \(NaN or inf\) in rows 4000-"):
        featcache.probe(bad, max_memory="100KiB", **PROBE)


def test_rows_read_in_chunks_leave_arrays_in_memory_as_they_were():
    from featcache.evaluation.data import Splits
    from featcache.evaluation.rows import StoreRows

    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    data = Splits.in_memory((x, np.zeros(10)), (x, np.zeros(10)))
    for idx in (np.arange(10), np.array([1, 4, 5, 9])):  # whole chunks and gathered rows
        rows = StoreRows(data, "train", idx, (1.0, 2.0), 3, "cpu")
        got = np.concatenate([xb.numpy() for xb, _ in rows.chunks_on_device()])
        np.testing.assert_array_equal(got, (x[idx] - 1.0) / 2.0)
        np.testing.assert_array_equal(x, np.arange(40, dtype=np.float32).reshape(10, 4))

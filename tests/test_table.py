"""`featcache table`: one row per store from the results beside it; bootstrap intervals."""

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image_folder, tiny_extract_args

import featcache
from featcache.cli import main
from featcache.evaluation.metrics import bootstrap_interval
from featcache.store import result_path


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Three stores: two with every result beside them (two feature sets of one backbone,
    separable to different degrees), one with none."""
    tmp = tmp_path_factory.mktemp("table")
    folder = make_image_folder(tmp / "images", train=12, test=6)
    paths = []
    for name, per_class in (("a", 12), ("b", 8), ("c", 6)):
        out = tmp / f"{name}.h5"
        _run(*tiny_extract_args(folder, out, "--train-per-class", per_class))
        paths.append(out)
    for path, features in ((paths[0], "pooled"), (paths[1], "maxpool")):
        f = ["--features", features]
        for command, extra in (
            ("probe", ["--epochs", "5"]),
            ("knn", ["--k", "5,20"]),
            ("retrieval", []),
            ("cluster", []),
        ):
            _run(command, "--store", path, *f, *extra, "--json", result_path(path, command))
        _run("probe", "--store", path, *f, "--shots", "1,2", "--repeats", "1", "--epochs", "5",
             "--json", result_path(path, "shots"))  # fmt: skip
    return paths


COLUMNS = [
    "backbone", "features", "dataset", "subset", "probe top-1", "95% CI", "mean per-class",
    "k-NN top-1 (k=20)", "retrieval mAP", "k-means NMI", "1-shot top-1", "2-shot top-1",
    "extraction img/s", "store",
]  # fmt: skip


def test_markdown_and_csv_over_three_stores(stores, tmp_path):
    _run("table", *stores, "--out", tmp_path / "t.md")
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == COLUMNS
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(rows) == 3
    probe = {p: json.loads(result_path(p, "probe").read_text()) for p in stores[:2]}
    knn = {p: json.loads(result_path(p, "knn").read_text()) for p in stores[:2]}
    order = sorted(stores[:2], key=lambda p: -probe[p]["test"]["top1"])
    for row, path in zip(rows, order):  # best probe first, then the store without results
        cells = dict(zip(COLUMNS, row))
        t = probe[path]["test"]
        assert cells["probe top-1"] == f"{t['top1']:.2f}"
        assert cells["95% CI"] == f"{t['top1_ci95'][0]:.2f}-{t['top1_ci95'][1]:.2f}"
        assert cells["k-NN top-1 (k=20)"] == f"{knn[path]['results'][1]['top1']:.2f}"
        assert cells["features"] == probe[path]["features"] and cells["store"] == str(path)
        assert float(cells["extraction img/s"]) > 0
    empty = dict(zip(COLUMNS, rows[2]))
    assert empty["store"] == str(stores[2]) and empty["backbone"] == "test-tiny"
    assert empty["probe top-1"] == empty["retrieval mAP"] == empty["1-shot top-1"] == ""

    _run("table", *stores, "--format", "csv", "--out", tmp_path / "t.csv")
    table = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    first = table[0]
    assert float(first["probe_top1"]) == probe[order[0]]["test"]["top1"]
    assert [float(first["probe_ci95_low"]), float(first["probe_ci95_high"])] == probe[order[0]][
        "test"
    ]["top1_ci95"]
    assert table[2]["probe_top1"] == "" and table[2]["dataset"].startswith("imagefolder:")

    out = json.loads(_run("table", *stores, "--format", "json"))
    assert [r["store"] for r in out] == [*map(str, order), str(stores[2])]


def test_result_files_and_a_stale_result(stores, tmp_path):
    """A JSON argument is one result; a result of another version of the store is left out."""
    rows = json.loads(_run("table", result_path(stores[0], "knn"), "--format", "json"))
    assert len(rows) == 1 and rows[0]["probe_top1"] is None and rows[0]["knn_top1_k20"] > 0
    stale = json.loads(result_path(stores[1], "probe").read_text())
    stale["fingerprint"] = "0" * 64
    rows = json.loads(_run("table", stores[1], "--format", "json"))
    assert rows[0]["probe_top1"] is not None  # the store's own, current result
    own = result_path(stores[1], "probe").read_text()
    try:
        result_path(stores[1], "probe").write_text(json.dumps(stale))
        rows = json.loads(_run("table", stores[1], "--format", "json"))
    finally:
        result_path(stores[1], "probe").write_text(own)
    assert rows[0]["probe_top1"] is None and rows[0]["retrieval_map"] is not None
    # The store and its result file together: one row, not two.
    rows = json.loads(_run("table", stores[1], result_path(stores[1], "knn"), "--format", "json"))
    assert len(rows) == 1 and rows[0]["probe_top1"] is not None


def test_the_knn_interval_is_the_bootstrap_of_its_own_predictions(stores):
    """The interval recomputed from a plain numpy k-NN's predictions on the same features:
    overlapping classes, so that some test images are wrong and the interval has a width."""
    del stores
    rng = np.random.default_rng(0)
    y, yt = rng.integers(0, 3, 300), rng.integers(0, 3, 200)
    x = (rng.normal(size=(300, 8)) + y[:, None]).astype(np.float32)
    xt = (rng.normal(size=(200, 8)) + yt[:, None]).astype(np.float32)
    result = featcache.knn(train=(x, y), test=(xt, yt), k=(5,))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sim = unit(xt) @ unit(x).T
    idx = np.argsort(-sim, axis=1)[:, :5]
    votes = np.zeros((len(xt), 3))
    for j in range(5):
        votes[np.arange(len(xt)), y[idx[:, j]]] += np.exp(sim[np.arange(len(xt)), idx[:, j]] / 0.07)
    correct = votes.argmax(1) == yt
    assert 40 < 100 * correct.mean() < 95  # neither chance nor all right
    assert result.top1 == result.top1_at[5] == pytest.approx(100 * correct.mean())
    # The interval: the percentile bootstrap written out (numpy's default_rng(0), 1000
    # resamples of the test images drawn 100 at a time), from these predictions.
    rng = np.random.default_rng(0)
    draws = np.concatenate([rng.integers(0, len(correct), (100, len(correct))) for _ in range(10)])
    accuracy = 100 * correct[draws].mean(1)
    want = [np.quantile(accuracy, 0.025), np.quantile(accuracy, 0.975)]
    assert result.to_dict()["results"][0]["top1_ci95"] == pytest.approx(want, abs=1e-9)


def test_the_bootstrap_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    correct = rng.random(20_000) < 0.8
    p = correct.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / len(correct)) * 100
    lo, hi = bootstrap_interval(correct)
    assert lo == pytest.approx(100 * p - half, abs=0.1) and hi == pytest.approx(
        100 * p + half, abs=0.1
    )
    assert bootstrap_interval(np.ones(50, bool)) == [100.0, 100.0]


def test_every_feature_set_gets_a_result_and_a_row(stores, tmp_path):
    """--features all: one result per set (a JSON list), one table row per set."""
    store = stores[2]
    results = featcache.knn(store, features="all", k=(5,))
    assert [r.data["features"] for r in results] == ["pooled", "maxpool"]  # the store's order
    assert results[1].top1 == featcache.knn(store, features="maxpool", k=(5,)).top1
    out = _run("probe", "--store", store, "--features", "all", "--epochs", "3",
               "--json", tmp_path / "all.json")  # fmt: skip
    saved = json.loads((tmp_path / "all.json").read_text())
    assert [r["features"] for r in saved] == ["pooled", "maxpool"] and out.count("probe") >= 2
    table = list(
        csv.DictReader(io.StringIO(_run("table", tmp_path / "all.json", "--format", "csv")))
    )
    assert sorted(r["features"] for r in table) == ["maxpool", "pooled"]
    assert all(float(r["probe_top1"]) > 0 for r in table)

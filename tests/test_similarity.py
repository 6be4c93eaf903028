"""CKA and RSA (featcache similarity) against plain numpy transcriptions of the published
formulas: Kornblith et al.'s gram-matrix CKA (biased and unbiased centring, gram_rbf with the
median bandwidth) and RSA as Spearman's correlation of correlation-distance RDMs."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image_folder, tiny_config

import featcache
from featcache.cli import main
from featcache.errors import StoreError
from featcache.evaluation.similarity import centred, linear_cka, rbf_cka, rsa
from featcache.extraction.extract import extract


# --- The reference: Kornblith et al. (2019)'s published code, transcribed with numpy. --------
def _gram_linear(x):
    return x @ x.T


def _gram_rbf(x, threshold=1.0):
    dot = x @ x.T
    sq = np.diag(dot)
    d = -2 * dot + sq[:, None] + sq[None, :]
    return np.exp(-d / (2 * threshold**2 * np.median(d)))


def _center_gram(gram, unbiased=False):
    gram = gram.copy()
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def _cka(gx, gy, debiased=False):
    gx, gy = _center_gram(gx, debiased), _center_gram(gy, debiased)
    return gx.ravel() @ gy.ravel() / (np.linalg.norm(gx) * np.linalg.norm(gy))


def _rsa(x, y):
    def ranks(v):  # continuous values: no ties
        r = np.empty(len(v))
        r[np.argsort(v)] = np.arange(len(v))
        return r

    iu = np.triu_indices(len(x), k=1)
    a, b = ranks((1 - np.corrcoef(x))[iu]), ranks((1 - np.corrcoef(y))[iu])
    return np.corrcoef(a, b)[0, 1]


# ---------------------------------------------------------------------------------------------


class _Set:
    """An in-memory stand-in for a matched FeatureSet (linear_cka reads rows by position)."""

    def __init__(self, name, x):
        self.name, self.x, self.positions = name, x, np.arange(len(x))


@pytest.fixture
def pair(monkeypatch):
    import featcache.evaluation.similarity as sim

    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 20)) + 3.0  # off-centre, as real features are
    y = np.tanh(x @ rng.normal(size=(20, 30))) + 0.3 * rng.normal(size=(150, 30))
    monkeypatch.setattr(sim, "_rows", lambda s, split, pos: s.x[pos])
    monkeypatch.setattr(sim, "_CHUNK", 64)  # several chunks: the sums across them are tested
    return x, y


def _linear(x, y):
    a, b = _Set("a", x), _Set("b", y)
    return linear_cka(a, b, "test", centred(a, "test"), centred(b, "test"))


def test_linear_cka_equals_the_published_gram_formulas(pair):
    x, y = pair
    got = _linear(x, y)
    assert got["linear_cka"] == pytest.approx(_cka(_gram_linear(x), _gram_linear(y)), abs=1e-9)
    ref_unbiased = _cka(_gram_linear(x), _gram_linear(y), debiased=True)
    assert got["linear_cka_unbiased"] == pytest.approx(ref_unbiased, abs=1e-9)
    assert abs(got["linear_cka"] - got["linear_cka_unbiased"]) > 1e-3  # two estimators


def test_rbf_cka_and_rsa_equal_the_published_formulas(pair):
    x, y = pair
    assert rbf_cka(x, y) == pytest.approx(_cka(_gram_rbf(x), _gram_rbf(y)), abs=1e-9)
    assert rsa(x, y) == pytest.approx(_rsa(x, y), abs=1e-9)


def test_cka_of_a_rotated_and_shifted_copy_is_one(pair):
    x, _ = pair
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(20, 20)))
    z = x @ q + 5.0
    got = _linear(x, z)
    assert got["linear_cka"] == pytest.approx(1.0, abs=1e-9)
    assert got["linear_cka_unbiased"] == pytest.approx(1.0, abs=1e-9)
    assert rbf_cka(x, z) == pytest.approx(1.0, abs=1e-9)
    assert _linear(x, np.random.default_rng(2).normal(size=x.shape))["linear_cka"] < 0.5


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    folder = make_image_folder(root / "images", train=2, test=40)

    def make(name, **kw):
        return extract(tiny_config(folder, root / f"{name}.h5", **kw)).path

    return {"all": make("all"), "part": make("part", test_per_class=30), "root": root,
            "folder": folder}  # fmt: skip


def test_stores_are_matched_by_id_and_every_pair_is_compared(stores, tmp_path):
    from featcache.store import Store

    result = featcache.similarity(
        stores["all"], f"{stores['part']}:all", rsa_images=50, seed=3, min_images=50
    )
    assert result.sets == ("all:pooled", "part:pooled", "part:maxpool")
    assert result.images == 90  # the images both stores hold
    m = result.matrix()
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    assert m[0, 1] == pytest.approx(1.0, abs=1e-9)  # the same images through the same model
    # The matched rows themselves, compared with the reference.
    a, b = (
        Store(stores["all"]).load("test", "pooled"),
        Store(stores["part"]).load("test", "maxpool"),
    )
    rows = {i: k for k, i in enumerate(a.ids)}
    xa = a.features[[rows[i] for i in b.ids]].astype(np.float64)
    ref = _cka(_gram_linear(xa), _gram_linear(b.features.astype(np.float64)))
    assert m[0, 2] == pytest.approx(ref, abs=1e-6)
    assert result.data["sample_images"] == 50


def test_disjoint_ids_and_disagreeing_labels_are_refused(stores, tmp_path):
    with pytest.raises(StoreError, match="90 images of the test split in common.*fewer than 100"):
        featcache.similarity(stores["all"], stores["part"], min_images=100)
    with pytest.raises(StoreError, match=r"have 0 images of the test split in common"):
        featcache.similarity(_relabelled(stores, tmp_path, ids=True), stores["all"])
    with pytest.raises(StoreError, match="labels image .* otherwise than"):
        featcache.similarity(_relabelled(stores, tmp_path), stores["all"])


def _relabelled(stores, tmp_path, ids=False):
    """A copy of a store with its test labels rotated (or its ids renamed)."""
    import shutil

    import h5py

    out = tmp_path / ("renamed.h5" if ids else "relabelled.h5")
    shutil.copy(stores["all"], out)
    with h5py.File(out, "r+") as f:
        if ids:
            f["test"]["ids"][...] = np.array([b"x" + i for i in f["test"]["ids"][:]])
        else:
            f["test"]["labels"][...] = (f["test"]["labels"][:] + 1) % 3
    return out


def test_the_command_line_writes_the_matrices_and_a_heatmap(stores, tmp_path):
    args = ["similarity", f"{stores['all']}:all", str(stores["part"]), "--rsa-images", "40",
            "--min-images", "50",
            "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["sets"] == ["all:pooled", "all:maxpool", "part:pooled"]
    assert set(saved) >= {"linear_cka", "linear_cka_unbiased", "rbf_cka", "rsa", "config"}
    assert "all:pooled ~ part:pooled: linear_cka 1.0000" in r.output
    assert (tmp_path / "s.png").stat().st_size > 5000
    r = CliRunner().invoke(main, ["similarity", str(stores["all"])])
    assert r.exit_code == 1 and "two or more feature sets" in r.output


def test_a_store_with_an_id_twice_is_refused(stores, tmp_path):
    import shutil

    import h5py

    out = tmp_path / "twice.h5"
    shutil.copy(stores["all"], out)
    with h5py.File(out, "r+") as f:
        ids = f["test"]["ids"][:]
        ids[1] = ids[0]
        f["test"]["ids"][...] = ids
    with pytest.raises(StoreError, match="holds an image id twice in its test split"):
        featcache.similarity(out, stores["all"])

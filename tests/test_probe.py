from dataclasses import replace

import numpy as np
import pytest

from featcache.evaluation.data import Splits, stratified_split
from featcache.evaluation.metrics import topk_accuracy
from featcache.evaluation.probe import ProbeConfig, probe


def fit_probe(x, y, xt, yt, num_classes, cfg, train_views=None):
    """The probe on in-memory features (``num_classes`` as their labels say)."""
    data = Splits.in_memory((x, y), (xt, yt), train_views)
    assert data.num_classes == num_classes
    return probe(data, cfg)


def _blobs(n_per_class, classes, dim, scale, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(scale=scale, size=(len(y), dim))
    return (x * 50 + 7).astype(np.float32), y  # badly scaled on purpose: standardised inside


def test_separable_data_is_learned_perfectly():
    x, y = _blobs(40, 4, 8, 0.1, 0)
    xt, yt = _blobs(10, 4, 8, 0.1, 0)
    cfg = ProbeConfig(max_epochs=100, weight_decays=(0.0, 1e-3))
    r = fit_probe(x, y, xt, yt, 4, cfg)
    assert r["test"]["top1"] == 100.0
    assert r["test"]["top3"] == 100.0
    assert r["test"]["loss"] < 0.1
    assert r["selected"]["weight_decay"] in (0.0, 1e-3)
    assert len(r["epochs"]) >= r["selected"]["epochs"]
    e = r["epochs"][0]
    assert set(e) == {"epoch", "train", "val"} and set(e["val"]) == {"loss", "top1", "top3"}
    assert len(r["per_class_top1"]) == 4
    assert r["device"] == "cpu"  # "auto" resolved: where the heads trained


def test_strong_weight_decay_loses_on_noisy_data_and_is_not_chosen():
    x, y = _blobs(60, 5, 20, 2.0, 1)
    xt, yt = _blobs(30, 5, 20, 2.0, 2)
    cfg = ProbeConfig(max_epochs=40, weight_decays=(1e-4, 10.0))
    r = fit_probe(x, y, xt, yt, 5, cfg)
    by_wd = {s["weight_decay"]: s["val"]["loss"] for s in r["sweep"]}
    assert by_wd[10.0] > by_wd[1e-4]
    assert r["selected"]["weight_decay"] == 1e-4


def test_heads_trained_together_equal_heads_trained_alone():
    x, y = _blobs(30, 3, 6, 1.0, 3)
    together = fit_probe(
        x, y, x, y, 3, ProbeConfig(max_epochs=5, patience=99, weight_decays=(0.0, 1e-2))
    )
    alone = fit_probe(x, y, x, y, 3, ProbeConfig(max_epochs=5, patience=99, weight_decays=(1e-2,)))
    np.testing.assert_allclose(
        together["sweep"][1]["val"]["loss"], alone["sweep"][0]["val"]["loss"], rtol=1e-4
    )


def test_stratified_split_holds_out_every_class():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    fit, val = stratified_split(y, 0.1, seed=0)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == 100
    assert np.bincount(y[val]).tolist() == [1, 2, 3, 4]
    assert stratified_split(y, 0.1, 0)[1].tolist() == val.tolist()


def test_topk_accuracy_by_hand():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(200 / 3)


def test_config_validates():
    with pytest.raises(ValueError, match="--val-fraction"):
        ProbeConfig(val_fraction=1.5)


def test_views_add_training_rows_but_not_validation_rows():
    """Views that lie (each image's views sit on another class's centre) are trained on:
    validation, on clean images only, falls from perfect to below chance's double."""
    x, y = _blobs(30, 3, 6, 0.3, 4)
    centres = np.stack([x[y == c].mean(0) for c in range(3)])
    views = np.repeat(centres[(y + 1) % 3][:, None, :], 4, axis=1)  # 4 views per image
    cfg = ProbeConfig(max_epochs=10, weight_decays=(1e-3,), cv_below=0)  # one split
    with_views = fit_probe(x, y, x, y, 3, cfg, train_views=views)
    without = fit_probe(x, y, x, y, 3, cfg)
    assert with_views["views"] == 5 and without["views"] == 1
    assert with_views["num_val"] == without["num_val"] == 9  # views add training rows only
    assert without["sweep"][0]["val"]["top1"] == 100.0
    assert with_views["sweep"][0]["val"]["top1"] < 50.0


def test_features_that_are_not_finite_are_refused_by_count():
    x, y = _blobs(20, 3, 4, 0.1, 0)
    x[3, 1], x[5, 2] = np.nan, np.inf
    with pytest.raises(ValueError, match="training features hold 2 non-finite values"):
        fit_probe(x, y, x, y, 3, ProbeConfig(max_epochs=2))


def test_a_sweep_with_no_finite_validation_loss_is_an_error_not_chance_accuracy():
    """It used to return an all-zero head, reported as a chance-level result."""
    x, y = _blobs(20, 3, 4, 0.1, 0)
    cfg = ProbeConfig(max_epochs=5, weight_decays=(0.0, 0.1), lr=1e300)
    with pytest.raises(ValueError, match="no weight decay reached a finite validation loss") as e:
        fit_probe(x, y, x, y, 3, cfg)
    assert "0 from epoch 1, 0.1 from epoch 1" in str(e.value) and "lower --lr" in str(e.value)


def test_small_training_sets_choose_the_weight_decay_by_cross_validation():
    """Below cv_below rows the heads of 5 folds x the weight decays train together, each on
    its fold's training rows: the choice is the lowest mean held-out loss, its spread kept."""
    x, y = _blobs(40, 3, 6, 0.5, 7)
    cfg = ProbeConfig(max_epochs=15, weight_decays=(1e-3, 1e-1, 3.0))
    r = fit_probe(x, y, x, y, 3, cfg)
    assert r["cv_folds"] == 5 and r["num_val"] == 0 and len(r["sweep"]) == 3
    cv = [s["cv"] for s in r["sweep"]]
    chosen = min(range(3), key=lambda i: (cv[i]["loss_mean"], -cfg.weight_decays[i]))
    assert r["selected"]["weight_decay"] == cfg.weight_decays[chosen]
    assert r["selected"]["cv"] == cv[chosen] and cv[chosen]["loss_std"] > 0
    one_split = fit_probe(x, y, x, y, 3, replace(cfg, cv_below=0))
    assert "cv_folds" not in one_split and one_split["num_val"] == 12


def test_a_fold_never_trains_on_its_own_held_out_rows():
    """Random labels in 100 dimensions: 60 images a head could memorise. Held out properly,
    each fold scores chance; trained on its own held-out rows too, it would score ~100%."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 100)).astype(np.float32)
    y = np.tile(np.arange(3), 20)
    cfg = ProbeConfig(max_epochs=60, patience=60, weight_decays=(1e-4,))
    r = fit_probe(x, y, x, y, 3, cfg)
    assert r["cv_folds"] == 5 and r["sweep"][0]["cv"]["top1_mean"] < 60

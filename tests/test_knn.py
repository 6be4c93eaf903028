import numpy as np
import pytest

from featcache.evaluation.knn import KnnConfig, knn_evaluate, l2_normalize, search, weighted_vote


def test_vote_on_four_vectors_by_hand():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
    labels = np.array([0, 0, 1, 2])
    query = np.array([[1, 0.2]], np.float32)
    sims, idx = search(l2_normalize(train), l2_normalize(query), k=3)
    assert idx[0].tolist() == [1, 0, 2]  # cosine: (0.9,0.1) is closest to (1,0.2)
    q = np.array([1, 0.2]) / np.hypot(1, 0.2)
    expected_sims = [q @ (np.array([0.9, 0.1]) / np.hypot(0.9, 0.1)), q[0], q[1]]
    np.testing.assert_allclose(sims[0], expected_sims, rtol=1e-5)
    scores = weighted_vote(sims, labels[idx], num_classes=3, temperature=0.5)
    w = np.exp(np.array(expected_sims) / 0.5)
    np.testing.assert_allclose(scores[0], [w[0] + w[1], w[2], 0.0], rtol=1e-5)


def test_temperature_changes_the_winner():
    # One very close neighbour of class 1 against two moderately close ones of class 0.
    sims = np.array([[0.99, 0.6, 0.6]])
    labels = np.array([[1, 0, 0]])
    assert weighted_vote(sims, labels, 2, temperature=0.05).argmax() == 1
    assert weighted_vote(sims, labels, 2, temperature=10.0).argmax() == 0


def _numpy_knn(train, ytr, test, yte, k, t, c):
    a, b = l2_normalize(train), l2_normalize(test)
    sim = b @ a.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    s = np.take_along_axis(sim, idx, 1)
    scores = np.zeros((len(b), c))
    for q in range(len(b)):
        for j in range(k):
            scores[q, ytr[idx[q, j]]] += np.exp(s[q, j] / t)
    return 100 * (scores.argmax(1) == yte).mean()


def test_matches_a_plain_numpy_reference():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16))
    ytr, yte = rng.integers(0, 5, 300), rng.integers(0, 5, 80)
    train = centres[ytr] + rng.normal(scale=1.5, size=(300, 16))
    test = centres[yte] + rng.normal(scale=1.5, size=(80, 16))
    res = knn_evaluate(train, ytr, test, yte, 5, ks=(1, 10, 20), temperature=0.07, query_batch=7)
    for r in res:
        assert r["top1"] == pytest.approx(_numpy_knn(train, ytr, test, yte, r["k"], 0.07, 5))
        assert r["top3"] >= r["top1"]


def test_k_larger_than_train_set_is_a_clear_error():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="exceeds the 3 training samples"):
        knn_evaluate(x, np.arange(3), x, np.arange(3), 3, ks=(5,), temperature=0.1)


def test_config_validates():
    with pytest.raises(ValueError, match="--temperature"):
        KnnConfig(temperature=0)
    with pytest.raises(ValueError, match="--k"):
        KnnConfig(k=(0,))

import numpy as np
import pytest

from featcache.evaluation.cluster import cluster_accuracy, kmeans


def test_cluster_accuracy_matches_clusters_to_classes_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_accuracy(labels, np.array([2, 2, 0, 0, 1, 1])) == 100.0  # renamed clusters
    assert cluster_accuracy(labels, np.array([0, 0, 0, 0, 1, 1])) == pytest.approx(400 / 6)


def test_kmeans_recovers_separated_directions():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 10
    y = np.repeat(np.arange(4), 50)
    x = (centres[y] + rng.normal(size=(200, 16))).astype(np.float32)
    assert cluster_accuracy(y, kmeans(x, 4, iterations=20, restarts=3, seed=0)) == 100.0
    with pytest.raises(ValueError, match="fewer --clusters"):
        kmeans(x[:3], 4, 10, 1, 0)

"""Real data, real weights: efficientnet-lite0 on CIFAR-10 from ../shared (skipped without it).

featcache's k-NN must equal a plain-numpy weighted k-NN on the same stored features, and its
probe must land near scikit-learn's LogisticRegression with C chosen by the same criterion
(lowest validation loss on the same split).
"""

import pytest

from featcache.evaluation.baselines import numpy_knn, sklearn_probe
from featcache.evaluation.knn import KnnConfig
from featcache.evaluation.methods import run
from featcache.evaluation.probe import ProbeConfig
from featcache.extraction.extract import ExtractConfig, extract
from featcache.store import Store


@pytest.fixture(scope="module")
def lite0_store(cifar_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("acc") / "lite0.h5"
    extract(
        ExtractConfig(
            backbone="efficientnet-lite0",
            dataset=f"imagefolder:{cifar_dir}",
            out=str(out),
            train_per_class=100,
            test_per_class=100,
            progress=False,
        )
    )
    return out


def test_probe_and_knn_agree_with_reference_implementations(lite0_store):
    store = Store(lite0_store)
    tr, te = store.load("train", "pooled"), store.load("test", "pooled")
    assert len(tr.labels) == 1000 and len(te.labels) == 1000

    probe = run(lite0_store, "probe", ProbeConfig())
    ref = sklearn_probe(tr.features, tr.labels, te.features, te.labels)
    print(f"probe top-1 {probe['test']['top1']:.2f} vs sklearn {ref['test_top1']:.2f}")
    # Different optimisers (SGD stopped early, lbfgs to convergence): 1,000 test images.
    assert abs(probe["test"]["top1"] - ref["test_top1"]) <= 1.5
    assert probe["test"]["top1"] > 60  # ImageNet features on 10 classes: far above chance

    knn = {r["k"]: r for r in run(lite0_store, "knn", KnnConfig(k=(20,)))["results"]}
    plain = numpy_knn(tr.features, tr.labels, te.features, te.labels, 20, 0.07, 10)
    print(f"k-NN k=20 top-1 {knn[20]['top1']:.2f} vs numpy {plain:.2f}")
    assert knn[20]["top1"] == plain  # the same votes: the same predictions

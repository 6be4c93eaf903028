"""The one table of evaluation methods, and the one way a method runs on a store.

A method is a config dataclass and one function ``(Splits, config) -> result dict`` in its
own module; registered here once, it is what the Python API, the CLI, ``table`` and
``report`` offer. ``run`` opens the store, picks the feature set, reads what the method
reads, times it and adds the store's provenance: the same for every method.

Entries name their module rather than import it, so that the CLI starts without importing
torch, faiss or scikit-learn (``method.config`` and ``method.function`` import on first use).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from featcache.distributed import Distributed
from featcache.store import Store, open_store


@dataclass(frozen=True)
class Method:
    name: str  # the CLI command, the API function, the result kind (``S.<name>.json``)
    module: str  # where its config and function live
    config_name: str  # its config dataclass
    summary: str  # one line for help texts
    # Whether it reads both splits (else the one its config's ``split`` names).
    pair: bool = True
    # Whether it reads the store in chunks itself (k-NN: always; others: with max_memory).
    streams: bool = False
    # Whether it splits its work across torchrun's ranks (takes a ``dist`` argument).
    distributed: bool = False
    # Whether it compares feature sets of one or more stores (``compare``) rather than
    # evaluating one store's set (``run``): its function takes (FeatureSets, config).
    compares: bool = False

    @property
    def config(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)

    @property
    def function(self):
        return getattr(importlib.import_module(self.module), self.name)


METHODS = {
    m.name: m
    for m in (
        Method("probe", "featcache.evaluation.probe", "ProbeConfig",
               "linear heads: a weight-decay sweep with early stopping, then a retrain",
               distributed=True),
        Method("knn", "featcache.evaluation.knn", "KnnConfig",
               "DINO's weighted k-NN (faiss, cosine)", streams=True, distributed=True),
        Method("cluster", "featcache.evaluation.cluster", "ClusterConfig",
               "k-means with as many clusters as classes: NMI, ARI, Hungarian accuracy",
               pair=False),
        Method("retrieval", "featcache.evaluation.retrieval", "RetrievalConfig",
               "retrieval by class: mAP, mAP@R, recall@k"),
        Method("shots", "featcache.evaluation.shots", "ShotsConfig",
               "label efficiency: probe and k-NN with k labelled images per class"),
        Method("zeroshot", "featcache.evaluation.zeroshot", "ZeroshotConfig",
               "CLIP/SigLIP zero-shot: class names through prompt templates, cosine to embed",
               pair=False),
        Method("similarity", "featcache.evaluation.similarity", "SimilarityConfig",
               "CKA (linear, unbiased, RBF) and RSA between feature sets, by image id",
               compares=True),
    )
}  # fmt: skip


def run(store: str | Path | Store, method: str, cfg=None, features: str | None = None) -> dict:
    """``method`` on a store's feature set (default: the backbone's first), with the store's
    provenance and the seconds the method took (reading the features included)."""
    from featcache.evaluation.data import Splits

    m = METHODS[method]
    if m.compares:
        raise TypeError(f"{method} compares feature sets: use compare([...], {method!r})")
    cfg = cfg if cfg is not None else m.config()
    store = open_store(store)
    feature = features or store.default_feature()
    splits = ("train", "test") if m.pair else (cfg.split,)
    load = not (m.streams or getattr(cfg, "max_memory", None) is not None)
    start = time.perf_counter()
    views = getattr(cfg, "reads_views", False)  # the probe's SGD protocol only
    data = Splits.of_store(store, feature, splits, load=load, views=views)
    extra = {"dist": Distributed.from_env()} if m.distributed else {}
    result = m.function(data, cfg, **extra)
    seconds = time.perf_counter() - start
    return {**store.provenance(method, feature, cfg), "seconds": seconds, **result}


def compare(specs: list[str], method: str, cfg=None) -> dict:
    """A method that compares feature sets (``STORE``, ``STORE:FEATURE,...``, ``STORE:all``),
    timed; the stores' provenance is in its result."""
    from featcache.evaluation.similarity import feature_sets

    m = METHODS[method]
    cfg = cfg if cfg is not None else m.config()
    start = time.perf_counter()
    sets = [s for spec in specs for s in feature_sets(str(spec))]
    result = m.function(sets, cfg)
    return {**result, "config": asdict(cfg), "seconds": time.perf_counter() - start}


def run_in_memory(method: str, cfg, train, test, views=None) -> dict:
    """``method`` on in-memory (features, labels) pairs (``train`` None for one-split
    methods, whose split is ``test``)."""
    from featcache.evaluation.data import Splits

    m = METHODS[method]
    if getattr(cfg, "max_memory", None) is not None:
        raise TypeError("max_memory bounds what is read from a store; these features are in memory")
    data = Splits.in_memory(train, test, views)
    start = time.perf_counter()
    result = m.function(data, cfg)
    return {"kind": method, "seconds": time.perf_counter() - start, **result}

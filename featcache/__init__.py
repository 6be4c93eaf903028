"""featcache: extract frozen-backbone features once, evaluate them many times.

    import featcache

    run = featcache.extract(backbone="efficientnet-lite0", dataset="cifar10", out="s.h5")
    x, y, ids = run.store.features("train")
    result = featcache.probe(run.store)        # or probe(train=(x, y), test=(xt, yt))
    print(result.top1, result.weight_decay)

The functions are imported on first use: ``import featcache`` stays light (no torch).
"""

__version__ = "0.1.0"

# Public name -> the module that defines it (featcache.api unless said otherwise).
_PUBLIC = {
    "extract": "featcache.api",
    "probe": "featcache.api",
    "knn": "featcache.api",
    "cluster": "featcache.api",
    "shots": "featcache.api",
    "retrieval": "featcache.api",
    "export": "featcache.api",
    "similarity": "featcache.api",
    "zeroshot": "featcache.api",
    "ZeroshotResult": "featcache.api",
    "SimilarityResult": "featcache.api",
    "Store": "featcache.store",
    "ProbeResult": "featcache.api",
    "KnnResult": "featcache.api",
    "ClusterResult": "featcache.api",
    "ShotsResult": "featcache.api",
    "RetrievalResult": "featcache.api",
    "ExtractResult": "featcache.api",
    "evaluate": "featcache.api",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

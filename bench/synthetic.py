"""Synthetic stores of any shape, written through featcache's own store writer.

Features are drawn from class-conditional Gaussians (a random centre per class plus unit
noise), so that probe and k-NN accuracies mean something; a store of ImageNet-1k's shape is
``write_synthetic(path, 1_281_167, 50_000, 384, 1000)``. Rows are generated and written a
shard at a time: memory stays at one shard however large the store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.store import ShardedWriter, SplitLayout


def write_synthetic(
    path: str | Path,
    train: int,
    test: int,
    dim: int,
    classes: int,
    dtype: str = "float32",
    separation: float = 0.35,
    shard_rows: int = 65536,
    seed: int = 0,
) -> Path:
    path = Path(path)
    centres = np.random.default_rng(seed).normal(size=(classes, dim)).astype(np.float32)
    fields = {
        "feature_version": 1,
        "backbone": {
            "name": f"synthetic-{dim}d",
            "family": "synthetic",
            "arch": {},
            "features": {"x": dim},
            "default_feature": "x",
        },
        "weights": "none",
        "dataset": {"kind": "synthetic", "rows": {"train": train, "test": test}, "seed": seed},
        **({"dtype": dtype} if dtype != "float32" else {}),
    }
    sizes = {"train": train, "test": test}
    writer = ShardedWriter(path, fields, overwrite=True)
    writer.begin(
        {split: SplitLayout(n, 14, {"features/x": (dim,)}) for split, n in sizes.items()},
        {"class_names": [f"class{c}" for c in range(classes)], "backbone_spec": {}},
    )
    shards = {}
    for s, (split, n) in enumerate(sizes.items()):
        shards[split] = [range(a, min(a + shard_rows, n)) for a in range(0, n, shard_rows)]
        for i, r in enumerate(shards[split]):
            rng = np.random.default_rng([seed, s, i])
            labels = rng.integers(0, classes, len(r))
            x = separation * centres[labels] + rng.normal(size=(len(r), dim)).astype(np.float32)
            ids = [f"{split}/{j:08d}" for j in r]
            writer.write_shard(split, i, r.start, ids, labels, {"features/x": x}, [], 0.0)
    meta = {"config": {"dataset": "synthetic", "dtype": dtype}, "extraction": {}}
    return writer.assemble(shards, meta)

"""Synthetic stores of any shape, written through featcache's own store writer.

Features are drawn from class-conditional Gaussians (a random centre per class plus unit
noise), so that probe and k-NN accuracies mean something; a store of ImageNet-1k's shape is
``write_synthetic(path, 1_281_167, 50_000, 384, 1000)``. Rows are generated and written a
shard at a time: memory stays at one shard however large the store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.store import ShardedWriter


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
    writer = ShardedWriter(path, fields, overwrite=True)
    writer.begin()
    shards = {}
    for s, (split, n) in enumerate((("train", train), ("test", test))):
        shards[split] = -(-n // shard_rows)
        for i, start in enumerate(range(0, n, shard_rows)):
            rng = np.random.default_rng([seed, s, i])
            rows = min(shard_rows, n - start)
            labels = rng.integers(0, classes, rows)
            x = separation * centres[labels] + rng.normal(size=(rows, dim)).astype(np.float32)
            ids = [f"{split}/{start + j:08d}" for j in range(rows)]
            writer.write_shard(split, i, ids, labels, {"features/x": x}, [], 0.0)
    meta = {
        "class_names": [f"class{c}" for c in range(classes)],
        "config": {"dataset": "synthetic", "dtype": dtype},
        "extraction": {},
        "backbone_spec": {},
    }
    return writer.assemble(shards, meta)

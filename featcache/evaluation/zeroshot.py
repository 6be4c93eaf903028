"""Zero-shot classification of stored CLIP or SigLIP image embeddings (``embed``): cosine
similarity to each class's text embedding (``S.zeroshot.npz``, made with the store's own text
tower by ``featcache zeroshot``: extraction/zeroshot.py), times the model's logit scale;
CLIP's classes compete in a softmax, SigLIP's are scored each on its own, sigmoid(scale * cos
+ bias). Top-1, top-5 and mean per-class recall with the top-1's bootstrap interval.

The sigmoid and the softmax are monotone in the logits, so the classes rank by the logits
themselves (where the sigmoid would round two high scores to the same 1.0, the logits still
order them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache.errors import FeatcacheError
from featcache.evaluation.data import Splits
from featcache.evaluation.metrics import classification_summary, topk_accuracy
from featcache.store import zeroshot_path


@dataclass(frozen=True)
class ZeroshotConfig:
    # "openai" (CLIP's 18 CIFAR templates) or a file with one template a line ({c}: the name).
    templates: str = "openai"
    # A file with one class name a line, in label order (default: the store's class names).
    classnames: str | None = None
    # The weights the store was made with, where they are local (as extract --weights).
    weights: str | None = None
    split: str = "test"


def zeroshot(data: Splits, cfg: ZeroshotConfig) -> dict:
    if data.store is None or data.feature != "embed":
        raise FeatcacheError(
            "zero-shot scores a CLIP or SigLIP store's image embeddings: its 'embed' feature "
            f"set (not {data.feature!r})"
        )
    path = zeroshot_path(data.store.path)
    if not path.is_file():
        raise FeatcacheError(
            f"no zero-shot classifier beside {data.store.path}: run featcache zeroshot"
        )
    with np.load(path, allow_pickle=False) as saved:
        head = {k: saved[k] for k in saved.files}
    if str(head["fingerprint"]) != data.store.fingerprint or list(head["spec"]) != [
        cfg.templates, cfg.classnames or ""
    ]:  # fmt: skip
        raise FeatcacheError(f"{path} was made for another store version or other templates: "
                             "run featcache zeroshot again")  # fmt: skip
    x = data.x(cfg.split)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    sigmoid = str(head.get("scoring", "softmax")) == "sigmoid"  # heads made before SigLIP: CLIP
    bias = float(head["logit_bias"]) if sigmoid else 0.0
    scores = float(head["logit_scale"]) * (x @ head["head"].T) + bias
    labels = data.labels[cfg.split]
    return {
        "split": cfg.split,
        "test": {
            **classification_summary(scores, labels),
            "top5": topk_accuracy(scores, labels, min(5, scores.shape[1])),
        },  # fmt: skip
        "classnames": head["classnames"].tolist(),
        "templates": len(head["templates"]),
        "scoring": "sigmoid" if sigmoid else "softmax",
        "logit_scale": float(head["logit_scale"]),
        **({"logit_bias": bias} if sigmoid else {}),
    }

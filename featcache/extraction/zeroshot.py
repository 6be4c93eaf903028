"""Zero-shot classifiers from the text tower of CLIP (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision") or SigLIP (Zhai et al. 2023,
"Sigmoid Loss for Language Image Pre-Training"); CLIP_benchmark's zero-shot protocol.

Each class name goes through every prompt template (``{c}`` marks the name) into the text
tower of the store's own weights; the unit-length embeddings are averaged per class and
normalised again (CLIP's ``zeroshot_classifier``, which CLIP_benchmark and open_clip use for
SigLIP too). The classifier, with the model's logit scale (and SigLIP's logit bias), is
written beside the store (``S.zeroshot.npz``): making it needs a model (stage 1, this
module), scoring the stored ``embed`` features against it does not (``evaluation/zeroshot.py``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from featcache.backbones import get_spec, weights_identity
from featcache.backbones.hf_models import load_text_tower
from featcache.errors import ArgumentError, FeatcacheError
from featcache.io import write_atomic
from featcache.store import Store, open_store, zeroshot_path

PROMPT_BATCH = 256  # prompts through the text tower at a time

# CLIP's 18 templates for CIFAR-10 and CIFAR-100 (openai/CLIP, data/prompts.md).
OPENAI_CIFAR = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
)


def templates_of(spec: str) -> list[str]:
    """``openai`` (CLIP's 18 for CIFAR) or a file with one template a line, each with ``{c}``."""
    if spec == "openai":
        return list(OPENAI_CIFAR)
    path = Path(spec)
    if not path.is_file():
        raise ArgumentError(f"--templates {spec}: neither 'openai' nor a file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    bad = [line for line in lines if "{c}" not in line]
    if not lines or bad:
        raise ArgumentError(
            f"--templates {spec}: every line is a template with {{c}} where the class name "
            f"goes, e.g. 'a photo of a {{c}}.'" + (f"; {bad[0]!r} has none" if bad else "")
        )
    return lines


def classnames_of(store: Store, path: str | None) -> list[str]:
    if path is None:
        return list(store.class_names)
    names = [n.strip() for n in Path(path).read_text(encoding="utf-8").splitlines() if n.strip()]
    if len(names) != len(store.class_names):
        raise ArgumentError(
            f"--classnames {path} names {len(names)} classes; the store has "
            f"{len(store.class_names)}, one name a line in label order"
        )
    return names


def write_head(store: str | Path | Store, templates: str = "openai",
               classnames: str | None = None, weights: str | None = None) -> Path:  # fmt: skip
    """The zero-shot classifier of a CLIP or SigLIP store, written beside it; returns its
    path."""
    store = open_store(store)
    name = store.fields["backbone"]["name"]
    if "embed" not in store.feature_sets:
        raise FeatcacheError(
            f"{store.path} was made with {name}, which has no image embedding ('embed'): "
            "zero-shot classification needs a CLIP or SigLIP store (e.g. clip-vitb16)"
        )
    spec = get_spec(name, weights)
    made_with, revision = store.fields["weights"], None
    if weights is None and made_with.startswith(f"{spec.weights_id}@"):
        # Hub weights: the very commit the store was made from (not the newest one).
        identity, revision = made_with, made_with.split("@", 1)[1]
    else:
        identity = weights_identity(spec, weights)
    if identity != made_with:
        raise FeatcacheError(
            f"the weights ({identity}) are not those {store.path} was made with "
            f"({made_with}): pass the store's own --weights"
        )
    names, prompts = classnames_of(store, classnames), templates_of(templates)
    tower = load_text_tower(spec, Path(weights).expanduser() if weights else None, revision)
    # Prompts in batches of PROMPT_BATCH (1000 classes x 18 templates padded to SigLIP's 64
    # tokens would hold gigabytes of activations at once); each class's embeddings averaged,
    # then normalised again.
    texts = [t.format(c=c) for c in names for t in prompts]
    every = torch.cat([tower.embed(texts[i : i + PROMPT_BATCH])
                       for i in range(0, len(texts), PROMPT_BATCH)])  # fmt: skip
    head = torch.nn.functional.normalize(every.view(len(names), len(prompts), -1).mean(1), dim=1)
    buf = io.BytesIO()
    np.savez(
        buf,
        head=head.numpy().astype(np.float32),
        logit_scale=np.float64(tower.logit_scale),
        scoring=np.array(tower.scoring),  # CLIP's softmax, SigLIP's sigmoid
        logit_bias=np.float64(tower.logit_bias or 0.0),  # SigLIP's: sigmoid(scale * cos + bias)
        classnames=np.array(names),
        templates=np.array(prompts),
        spec=np.array([templates, classnames or ""]),  # what was asked: scoring checks it
        fingerprint=np.array(store.fingerprint),
    )
    path = zeroshot_path(store.path)
    write_atomic(path, buf.getvalue())
    return path

"""DINO's attention maps: the last block's CLS-to-patch attention of every head.

Caron et al. 2021 (https://arxiv.org/abs/2104.14294), figure 1 / visualize_attention.py.

Making maps is stage 1 (a model over images), this module: ``featcache attention --store S``
maps the first test images of a store into ``S.attention.npz`` beside it; ``--images`` maps
any images into a PNG. Reading and drawing them is the report's (stage 2: no model, no dataset).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.backbones import get_spec, load_backbone, weights_identity
from featcache.datasets import IMAGE_EXTENSIONS, open_image
from featcache.errors import ArgumentError, FeatcacheError
from featcache.extraction.extract import dataset_splits, split_source
from featcache.io import write_atomic
from featcache.preprocessing import to_rgb
from featcache.store import Store, attention_path


@dataclass(frozen=True)
class AttentionConfig:
    """`featcache attention`'s settings."""

    max_images: int = 3  # images mapped (a store's first test images, or the first found)


def attention_maps(backbone: str, weights: str | None, images: list[Image.Image]):
    """(images uint8 (B, S, S, 3) as the model saw them, maps (B, heads, S/p, S/p))."""
    model, preprocess = load_backbone(backbone, weights)
    if not model.spec.attention:
        raise FeatcacheError(
            f"{backbone} has no attention maps; use a ViT backbone such as dino-vits16"
        )
    vit = model.model
    vit.set_attn_implementation("eager")  # the fused kernels do not return attention weights
    arrays = [_square(preprocess, img) for img in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        out = vit(pixel_values=preprocess(x), output_attentions=True)
    attn = out.attentions[-1][:, :, 0, 1:]  # (B, heads, N): CLS query, patch keys
    side = int(round(attn.shape[-1] ** 0.5))
    maps = attn.reshape(len(images), attn.shape[1], side, side).float().numpy()
    return np.stack(arrays), maps


def save_store_attention(store_path: str | Path, count: int = AttentionConfig.max_images):
    """Map the first ``count`` test images of a store with its own backbone and weights.

    Writes ``S.attention.npz`` (images, maps, their ids and the store's fingerprint) atomically
    beside the store; returns (path, images, maps).
    """
    store = Store(store_path)
    name = store.fields["backbone"]["name"]
    entry = store.backbone_spec or get_spec(name).to_dict()  # stores from before it was recorded
    if not entry.get("attention"):
        raise FeatcacheError(
            f"{store.path} was made with {name}, which has no attention maps; use a store of "
            "a ViT backbone such as dino-vits16"
        )
    if count < 1:
        raise ArgumentError(f"--max-images must be at least 1, got {count}")
    store.check("test")
    cfg = store.config
    test = [s for s in cfg.get("splits", ["test"]) if split_source(s)[0] == "test"] or ["test"]
    split = dataset_splits(cfg["dataset"], cfg.get("data_root"), test, cfg.get("image_column"),
                           cfg.get("label_column"))["test"]  # fmt: skip
    index = {sid: i for i, sid in enumerate(split.ids)}
    ids = store.read("test", "ids")[:count].tolist()
    missing = [i for i in ids if i not in index]
    if missing:
        raise FeatcacheError(
            f"the dataset of {store.path} ({cfg['dataset']}) no longer holds {missing[:3]}; "
            "map the images of the dataset the store was made from"
        )
    images, maps = attention_maps(name, cfg.get("weights"), [split.load(index[i]) for i in ids])
    now = weights_identity(get_spec(name), cfg.get("weights"))
    if now != store.fields["weights"]:
        raise FeatcacheError(
            f"the weights of {store.path} changed since it was made ({store.fields['weights']} "
            f"then, {now} now): its maps would not be its own; extract the store again"
        )
    buf = io.BytesIO()
    fingerprint = np.asarray(store.fingerprint)
    np.savez(buf, images=images, maps=maps, ids=np.asarray(ids, dtype=str), fingerprint=fingerprint)
    path = attention_path(store.path)
    write_atomic(path, buf.getvalue())
    return path, images, maps


def _square(preprocess, img: Image.Image) -> np.ndarray:
    """The image at the model's input size (CPU resize + centre crop for every image)."""
    img = to_rgb(img)
    arr = preprocess.prepare(img)
    if arr.shape[0] != preprocess.input_size:  # small squares: upscale for display too
        arr = np.asarray(
            Image.fromarray(arr).resize((preprocess.input_size,) * 2, Image.Resampling.BICUBIC)
        )
    return arr


def load_images(paths: list[str], limit: int = AttentionConfig.max_images) -> list[Image.Image]:
    """Images from files or folders (their first ``limit`` images, sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise FeatcacheError(f"--images {p}: no such file or directory")
    if not files:
        raise FeatcacheError(f"no images found in {paths}")
    return [open_image(f) for f in files[:limit]]  # bombs refused, as dataset images

"""DINO's attention maps: the last block's CLS-to-patch attention of every head.

Caron et al. 2021 (https://arxiv.org/abs/2104.14294), figure 1 / visualize_attention.py.

Making maps is stage 1 (a model over images): ``featcache attention --store S`` maps the first
test images of a store into ``S.attention.npz`` beside it, which the report reads;
``--images`` maps any images into a PNG. Reading and drawing maps load no model and no dataset
(the backbone registry and the datasets are imported by the functions that make maps only).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from featcache.errors import FeatcacheError


def attention_path(store: str | Path) -> Path:
    """Where the attention maps of a store lie: ``S.attention.npz`` beside ``S.h5``."""
    store = Path(store)
    return store.with_name(f"{store.stem}.attention.npz")


def attention_maps(backbone: str, weights: str | None, images: list[Image.Image]):
    """(images uint8 (B, S, S, 3) as the model saw them, maps (B, heads, S/p, S/p))."""
    import torch

    from featcache.backbones import load_backbone

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


def save_store_attention(store_path: str | Path, count: int = 3) -> Path:
    """Map the first ``count`` test images of a store with its own backbone and weights.

    Writes ``S.attention.npz`` (images, maps, their ids and the store's fingerprint) atomically
    beside the store and returns its path.
    """
    from featcache.datasets import load_dataset
    from featcache.store import Store, write_atomic

    store = Store(store_path)
    if not store.backbone_spec.get("attention"):
        raise FeatcacheError(
            f"{store.path} was made with {store.fields['backbone']['name']}, which has no "
            "attention maps; use a store of a ViT backbone such as dino-vits16"
        )
    cfg = store.config
    split = load_dataset(cfg["dataset"], cfg.get("data_root"), ("test",))["test"]
    index = {sid: i for i, sid in enumerate(split.ids)}
    ids = store.read("test", "ids")[:count].tolist()
    missing = [i for i in ids if i not in index]
    if missing:
        raise FeatcacheError(
            f"the dataset of {store.path} ({cfg['dataset']}) no longer holds {missing[:3]}; "
            "map the images of the dataset the store was made from"
        )
    images = [split.load(index[i]) for i in ids]
    shown, maps = attention_maps(cfg["backbone"], cfg.get("weights"), images)
    buf = io.BytesIO()
    fingerprint = np.asarray(store.fingerprint)
    np.savez(buf, images=shown, maps=maps, ids=np.asarray(ids, dtype=str), fingerprint=fingerprint)
    write_atomic(attention_path(store.path), buf.getvalue())
    return attention_path(store.path)


def read_store_attention(store) -> tuple[np.ndarray, np.ndarray] | str:
    """(images, maps) saved beside a ``Store``, or why there are none (a sentence)."""
    path = attention_path(store.path)
    hint = f"run `featcache attention --store {store.path}` to add them"
    if not path.is_file():
        return f"no attention maps yet: {hint}"
    with np.load(path, allow_pickle=False) as saved:  # never unpickles
        if str(saved["fingerprint"]) != store.fingerprint:
            return f"{path.name} belongs to another version of the store: {hint}"
        return saved["images"], saved["maps"]


def _square(preprocess, img: Image.Image) -> np.ndarray:
    """The image at the model's input size (CPU resize + centre crop for every image)."""
    from featcache.preprocess import to_rgb

    img = to_rgb(img)
    arr = preprocess.prepare(img)
    if arr.shape[0] != preprocess.input_size:  # small squares: upscale for display too
        arr = np.asarray(
            Image.fromarray(arr).resize((preprocess.input_size,) * 2, Image.Resampling.BICUBIC)
        )
    return arr


def load_images(paths: list[str], limit: int = 8) -> list[Image.Image]:
    """Images from files or folders (their first ``limit`` images, sorted)."""
    from featcache.datasets import IMAGE_EXTENSIONS

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
    out = []
    for f in files[:limit]:
        try:
            out.append(Image.open(f))
            out[-1].load()
        except OSError as exc:
            raise FeatcacheError(f"cannot read image {f}: {exc}") from exc
    return out


def plot_attention(images: np.ndarray, maps: np.ndarray, path, title: str) -> None:
    """One row per image: the image, then each head's map laid over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, heads = maps.shape[:2]
    fig, axes = plt.subplots(b, heads + 1, figsize=(1.6 * (heads + 1), 1.6 * b), squeeze=False)
    size = images.shape[1]
    for i in range(b):
        axes[i, 0].imshow(images[i])
        for h in range(heads):
            axes[i, h + 1].imshow(images[i])
            axes[i, h + 1].imshow(  # one cell per patch, stretched over the image
                maps[i, h],
                cmap="inferno",
                alpha=0.7,
                extent=(0, size, size, 0),
                interpolation="nearest",
            )
            if i == 0:
                axes[i, h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

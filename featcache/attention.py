"""DINO's attention maps: the last block's CLS-to-patch attention of every head.

Caron et al. 2021 (https://arxiv.org/abs/2104.14294), figure 1 / visualize_attention.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.backbones import load_backbone
from featcache.datasets import IMAGE_EXTENSIONS
from featcache.errors import FeatcacheError
from featcache.preprocess import to_rgb


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


def _square(preprocess, img: Image.Image) -> np.ndarray:
    """The image at the model's input size (CPU resize + centre crop for every image)."""
    img = to_rgb(img)
    arr = preprocess.prepare(img)
    if arr.shape[0] != preprocess.input_size:  # small squares: upscale for display too
        arr = np.asarray(
            Image.fromarray(arr).resize((preprocess.input_size,) * 2, Image.Resampling.BICUBIC)
        )
    return arr


def load_images(paths: list[str], limit: int = 8) -> list[Image.Image]:
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
    out = []
    for f in files[:limit]:
        try:
            out.append(Image.open(f))
            out[-1].load()
        except OSError as exc:
            raise FeatcacheError(f"cannot read image {f}: {exc}") from exc
    return out


def plot_attention(images: np.ndarray, maps: np.ndarray, path: str | Path, title: str) -> None:
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
            m = torch.from_numpy(maps[i, h])[None, None]
            up = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")[0, 0]
            axes[i, h + 1].imshow(images[i])
            axes[i, h + 1].imshow(up.numpy(), cmap="inferno", alpha=0.7)
            if i == 0:
                axes[i, h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

"""Preprocessing derived from a backbone entry: uint8 images in, normalised float batches out.

Small square images (CIFAR's 32x32) travel as uint8 and are upscaled on the device, in batches,
by interpolation (never padding). Larger or non-square photos get the backbone's usual resize
of the shorter side and centre crop on the CPU while loading, so that they can be batched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from featcache.device import native_uint8_resize

_PIL_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

INTERPOLATIONS = tuple(_PIL_INTERPOLATION)

# Bumped whenever this module's output for the same input changes (part of the fingerprint).
# 2: uint8 images are resized as uint8 (rounded and saturated, as PIL's resize does).
PREPROCESS_VERSION = 2


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB explicitly."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range onto 8-bit
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


@dataclass(frozen=True)
class Preprocess:
    """Resize and normalisation for one backbone, applied to uint8 images."""

    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float

    def to_dict(self) -> dict:
        return {**asdict(self), "version": PREPROCESS_VERSION}

    def needs_cpu_resize(self, width: int, height: int) -> bool:
        """Whether a (width, height) image is resized on the CPU before batching."""
        return width != height or width > self.input_size

    def prepare(self, img: Image.Image) -> np.ndarray:
        """A decoded image as a uint8 (H, W, 3) array ready to batch.

        Square images no larger than the input size are returned as they are (the device
        upscales them); others get resize-shorter-side to input/crop_pct and a centre crop.
        """
        img = to_rgb(img)
        w, h = img.size
        if self.needs_cpu_resize(w, h):
            scale = int(self.input_size / self.crop_pct)
            if w < h:
                size = (scale, max(1, round(h * scale / w)))
            else:
                size = (max(1, round(w * scale / h)), scale)
            img = img.resize(size, _PIL_INTERPOLATION[self.interpolation])
            left = (size[0] - self.input_size) // 2
            top = (size[1] - self.input_size) // 2
            img = img.crop((left, top, left + self.input_size, top + self.input_size))
        return np.asarray(img, dtype=np.uint8)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) images in [0, 255] on any device -> normalised float32 (B, 3, S, S).

        uint8 batches are resized as uint8, like PIL's resize (rounded, saturated), where the
        device has those kernels (several times faster than in float), and elsewhere in float
        to the same images within one grey level. Float batches (augmented views) stay float.
        """
        size = (self.input_size, self.input_size)
        x = images
        if tuple(x.shape[-2:]) != size:
            if x.dtype != torch.uint8:
                x = self._resize(x, size).clamp_(0, 255)
            elif native_uint8_resize(x.device):
                x = self._resize(x, size)
            else:
                # As the uint8 kernels do: a horizontal pass saturated to 0..255 (they keep it
                # in uint8; bicubic overshoots), then a vertical one, rounded and saturated.
                x = self._resize(x.float(), (x.shape[-2], size[1])).clamp_(0, 255)
                x = self._resize(x, size).round_().clamp_(0, 255)
        # A fresh float tensor (never the caller's), normalised in place.
        x = x.float() if x.dtype == torch.uint8 or x is not images else x.clone()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255
        scale = 1 / (torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255)
        return x.sub_(mean).mul_(scale)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        corners = False if self.interpolation != "nearest" else None
        return F.interpolate(x, size=size, mode=self.interpolation, align_corners=corners)

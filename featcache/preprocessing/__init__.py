"""Preprocessing derived from a backbone entry: uint8 images in, the model's input out.

Small square images (CIFAR's 32x32) travel as uint8 and are resized on the device, in
batches, to the input size with the entry's filter, exactly as PIL's ``Image.resize`` does:
by PIL itself on the CPU (threads), by Triton kernels doing its integer arithmetic on CUDA
(``triton_kernels.py``), by exact float64 products elsewhere (``pil.py``). Larger
or non-square photos get the entry's recipe on the CPU while loading (PIL itself): the
shorter side resized to ``input_size / crop_pct`` and the centre cropped, with the rounding of
the library whose transform the entry reproduces.

This package sits below the stages: backbones derive their preprocessing from it, extraction
applies it, and it imports neither.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from featcache.device import resize_kernel
from featcache.errors import ArgumentError
from featcache.preprocessing.pil import FILTERS, INTERPOLATIONS, pil_resize, resize_uint8

__all__ = [
    "INTERPOLATIONS", "PREPROCESS_VERSION", "RECIPES", "Preprocess", "resize_uint8", "to_rgb",
]  # fmt: skip

# Bumped whenever this package's output for the same input changes (part of the fingerprint).
# 2: uint8 images are resized as uint8 (rounded and saturated, as PIL's resize does).
# 3: devices without uint8 kernels (CUDA) resize with the CPU kernels' integer arithmetic.
# 4: every device makes PIL's images (its bicubic is a = -0.5, torch's -0.75); photos get
#    their recipe's sizes exactly (the long side truncated, the crop rounded as it rounds);
#    augmented views are rounded to uint8 before they are resized.
PREPROCESS_VERSION = 4

# How a recipe rounds its centre crop's offset; the long side is truncated by every one.
# torchvision: timm's and DINO's eval transforms (Resize + CenterCrop: round half to even);
# transformers: its image processors (floor).
RECIPES = ("torchvision", "transformers")


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
    recipe: str = "torchvision"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ArgumentError(
                f"interpolation {self.interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}"
            )
        if self.recipe not in RECIPES:
            raise ArgumentError(f"recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "version": PREPROCESS_VERSION}

    def needs_cpu_resize(self, width: int, height: int) -> bool:
        """Whether a (width, height) image is resized on the CPU before batching."""
        return width != height or width > self.input_size

    def prepare(self, img: Image.Image) -> np.ndarray:
        """A decoded image as a uint8 (H, W, 3) array ready to batch.

        Square images no larger than the input size are returned as they are (the device
        resizes them to the input size); others get the recipe's resize of the shorter side to
        ``input_size / crop_pct`` and its centre crop.
        """
        img = to_rgb(img)
        w, h = img.size
        if self.needs_cpu_resize(w, h):
            side = int(self.input_size / self.crop_pct)
            # torchvision's and transformers' sizes: the long side truncated, not rounded.
            size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
            img = img.resize(size, FILTERS[self.interpolation][2])
            left, top = (self._offset(n - self.input_size) for n in size)
            img = img.crop((left, top, left + self.input_size, top + self.input_size))
        return np.asarray(img, dtype=np.uint8)

    def _offset(self, excess: int) -> int:
        return round(excess / 2) if self.recipe == "torchvision" else excess // 2

    def __call__(
        self, images: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
    ) -> torch.Tensor:
        """uint8 (B, 3, h, w) images on any device -> the model's input: float32
        (B, 3, S, S) in ``memory_format``, PIL's resize normalised with the entry's mean
        and std, the same bits on every device."""
        if images.dtype != torch.uint8:
            raise TypeError(
                f"Preprocess takes uint8 images, got {images.dtype}: round float images to "
                "uint8 first, as an image file holds them"
            )
        size = (self.input_size, self.input_size)
        mean, scale = _constants(self.mean, self.std, images.device)
        kernel = resize_kernel(images.device)  # PIL's images on every path
        if kernel == "triton":
            from featcache.preprocessing import triton_kernels

            if triton_kernels.supports(tuple(images.shape[-2:]), size):
                return triton_kernels.resize_normalise(
                    images, size, self.interpolation, mean, scale, memory_format
                )
        x = images
        if x.shape[-2:] != size:
            x = (pil_resize if kernel == "pil" else resize_uint8)(x, size, self.interpolation)
        out = torch.empty(x.shape, device=x.device).contiguous(memory_format=memory_format)
        out.copy_(x)  # uint8 to float32 in place: no float temporary beside the output
        return out.sub_(mean.view(1, -1, 1, 1)).mul_(scale.view(1, -1, 1, 1))


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean * 255, 1 / (std * 255)) as float32 on the device: the normalisation of every
    path, computed once, so that every path subtracts and scales by the same numbers."""
    mean255 = torch.tensor(mean, dtype=torch.float32) * 255
    scale = 1 / (torch.tensor(std, dtype=torch.float32) * 255)
    return mean255.to(device), scale.to(device)

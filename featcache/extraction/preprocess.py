"""Preprocessing derived from a backbone entry: uint8 images in, normalised float batches out.

Small square images (CIFAR's 32x32) travel as uint8 and are upscaled on the device, in batches,
by interpolation (never padding). Larger or non-square photos get the backbone's usual resize
of the shorter side and centre crop on the CPU while loading, so that they can be batched.
"""

from __future__ import annotations

import functools
import math
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
# 3: devices without uint8 kernels (CUDA) resize with the CPU kernels' integer arithmetic
#    (the CPU's images are unchanged, but one version covers every device's output).
PREPROCESS_VERSION = 3


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

        uint8 batches are resized as uint8, like PIL's resize (rounded, saturated): by torch's
        uint8 kernels where the device has them (the CPU), elsewhere by the same integer
        arithmetic (``resize_uint8``), so that every device makes the same images, bit for bit.
        Float batches (augmented views) stay float.
        """
        size = (self.input_size, self.input_size)
        x = images
        if tuple(x.shape[-2:]) != size:
            if x.dtype != torch.uint8:
                x = self._resize(x, size).clamp_(0, 255)
            elif native_uint8_resize(x.device):
                x = self._resize(x, size)
            elif self.interpolation == "nearest":
                x = self._resize(x.float(), size)  # copies pixels: exact in float
            else:
                x = resize_uint8(x, size, self.interpolation)
        # A fresh float tensor (never the caller's), normalised in place.
        x = x.float() if x.dtype == torch.uint8 or x is not images else x.clone()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255
        scale = 1 / (torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255)
        return x.sub_(mean).mul_(scale)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        corners = False if self.interpolation != "nearest" else None
        return F.interpolate(x, size=size, mode=self.interpolation, align_corners=corners)


# torch's CPU uint8 resize (antialias off), for devices without it. Its weights are computed in
# float64 as for float images, then rounded to int16 at a precision of p bits; each axis (width
# first) is then out = clamp((sum(pixel * weight) + 2**(p-1)) >> p, 0, 255) in integers.
# After aten/src/ATen/native/cpu/UpSampleKernel.cpp (_compute_indices_min_size_weights,
# _compute_index_ranges_int16_weights).


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


_FILTERS = {"bilinear": (_bilinear, 2), "bicubic": (_bicubic, 4)}


@functools.lru_cache(maxsize=32)
def uint8_resize_weights(in_size: int, out_size: int, interpolation: str) -> np.ndarray:
    """One axis of the uint8 resize: the kernels' int16 weights over 2**p, an (out_size,
    in_size) float64 matrix W, so that the axis is floor(W @ pixels + 0.5) clamped to 0..255."""
    filter_fn, taps = _FILTERS[interpolation]
    scale = in_size / out_size
    support = taps // 2
    weights = np.zeros((out_size, in_size))
    wt_max = 0.0
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        if taps == 2 and src < 0:
            src = 0.0
        index = min(math.floor(np.float32(src)), in_size - 1)  # the kernels' floorf
        lam = min(max(src - index, 0.0), 1.0)
        for j in range(taps):
            # Taps outside the image add to the border pixel's weight (as float images clamp).
            k = min(max(index - support + 1 + j, 0), in_size - 1)
            weights[i, k] += filter_fn(j + 1 - support - lam)
            wt_max = max(wt_max, weights[i, k])
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    rounded = np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5))  # half away from zero
    weights = rounded / (1 << precision)
    weights.setflags(write=False)  # cached: shared by every caller
    return weights


@functools.lru_cache(maxsize=32)
def _weights_on(device: torch.device, n_in: int, n_out: int, interpolation: str) -> torch.Tensor:
    return torch.tensor(uint8_resize_weights(n_in, n_out, interpolation), device=device)


# float64 elements of a resize held at once (512 MiB): batches are resized a slice at a time.
_RESIZE_ELEMENTS = 2**26


def resize_uint8(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(B, C, h, w) uint8 -> float32 (B, C, *size) holding the uint8 images that torch's CPU
    kernel makes (``F.interpolate(..., antialias=False)``), on any device.

    Each axis is one matrix product in float64: its terms and their sums are multiples of
    2**-p whose numerators (int16 weight times pixel, summed) stay far below 2**53, so they
    are exact in any order, and the kernels' rounding shift is floor(x + 0.5).
    """
    out = torch.empty(*images.shape[:-2], *size, device=images.device)
    *_, c, h, w = images.shape
    step = max(1, _RESIZE_ELEMENTS // (c * max(h, size[0]) * max(w, size[1])))
    for i in range(0, len(images), step):
        x = images[i : i + step].to(torch.float64)
        for dim, n_out in ((-1, size[1]), (-2, size[0])):  # width first, as the kernels
            n_in = x.shape[dim]
            if n_in == n_out:
                continue  # as the kernels: an axis of the same size is copied
            weights = _weights_on(x.device, n_in, n_out, interpolation)
            x = x @ weights.T if dim == -1 else weights @ x
            x.add_(0.5).floor_().clamp_(0, 255)
        out[i : i + step] = x
    return out

"""PIL's ``Image.resize`` of 8-bit images, bit for bit, on batches on any torch device.

Models are trained and published with PIL's resize (timm's transforms, transformers' image
processors, DINO's evaluation), so featcache makes PIL's images exactly: a real network's
features move by a percent for one grey level on a sixth of the pixels.

PIL (src/libImaging/Resample.c) resizes in two passes (``pass_order``), each on 8-bit pixels. For
every output position it computes the filter's coefficients in double precision over the
source pixels in ``[first, first + count)``, normalises them to sum to one, and rounds each to
an integer ``K = round(k * 2**22)`` (half away from zero). A pass then writes::

    out = clip(floor((2**21 + sum(pixel * K)) / 2**22), 0, 255)     # int32 arithmetic

``coefficients`` transcribes that computation (same double-precision expressions in the same
order); ``resize_uint8`` evaluates the sums in float64, where they are exact (see there); the
CUDA kernels (``triton_kernels``) evaluate them in int32, as PIL does. Nearest neighbour takes
PIL's own source indices and is the same sum with one coefficient of 2**22.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import PIL
import torch
from PIL import Image

from featcache.errors import ArgumentError

PRECISION_BITS = 22  # PIL's: 32 bits - 8 for the pixel - 2 for the filters' overshoot
ONE = 1 << PRECISION_BITS
HALF = 1 << (PRECISION_BITS - 1)


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


_F54, _F46 = float(np.float32(0.54)), float(np.float32(0.46))  # C's 0.54f and 0.46f


def _hamming(x: float) -> float:
    x = -x if x < 0.0 else x
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_F54 + _F46 * math.cos(x))


def _bicubic(x: float) -> float:
    a = -0.5  # PIL's (torch's interpolate uses -0.75)
    x = -x if x < 0.0 else x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# name -> (filter, support, PIL's resampling code)
FILTERS = {
    "nearest": (None, 0.0, Image.Resampling.NEAREST),
    "box": (_box, 0.5, Image.Resampling.BOX),
    "bilinear": (_bilinear, 1.0, Image.Resampling.BILINEAR),
    "hamming": (_hamming, 1.0, Image.Resampling.HAMMING),
    "bicubic": (_bicubic, 2.0, Image.Resampling.BICUBIC),
    "lanczos": (_lanczos, 3.0, Image.Resampling.LANCZOS),
}
INTERPOLATIONS = tuple(FILTERS)


@dataclass(frozen=True)
class Coefficients:
    """One axis of a resize: output ``i`` reads source pixels ``first[i] + t`` for t < taps
    with integer weights ``weights[i, t]`` (0 past the pixels PIL reads)."""

    first: np.ndarray  # (out,) int32
    weights: np.ndarray  # (out, taps) int32
    in_size: int

    @property
    def taps(self) -> int:
        return self.weights.shape[1]

    def dense(self) -> np.ndarray:
        """(out, in) float64 matrix of the weights over 2**22 (exact: powers of two)."""
        m = np.zeros((len(self.first), self.in_size))
        rows = np.arange(len(self.first))[:, None]
        cols = np.minimum(self.first[:, None] + np.arange(self.taps), self.in_size - 1)
        np.add.at(m, (rows, cols), self.weights / ONE)  # clamped columns carry weight 0
        return m


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int, interpolation: str) -> Coefficients:
    """PIL's coefficients for resizing one axis from ``in_size`` to ``out_size`` pixels
    (precompute_coeffs and normalize_coeffs_8bpc of Resample.c, in the same order)."""
    if interpolation not in FILTERS:
        raise ArgumentError(
            f"unknown interpolation {interpolation!r}; choose from {INTERPOLATIONS}"
        )
    if interpolation == "nearest":
        first = _nearest_indices(in_size, out_size)
        return _frozen(Coefficients(first, np.full((out_size, 1), ONE, np.int32), in_size))
    fn, filter_support, _ = FILTERS[interpolation]
    scale = float(in_size) / out_size  # box (0, in_size) as C floats: exact
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    ss = 1.0 / filterscale
    first = np.zeros(out_size, np.int32)
    weights = np.zeros((out_size, taps), np.int32)
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [fn((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in k:
            ww += w
        if ww != 0.0:
            k = [w / ww for w in k]
        first[xx] = xmin
        weights[xx, :xmax] = [int(-0.5 + w * ONE) if w < 0 else int(0.5 + w * ONE) for w in k]
    return _frozen(Coefficients(first, weights, in_size))


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """The source pixel of each output pixel, as PIL's own nearest resize picks it: asked of
    PIL with a row of 32-bit pixels numbering their columns (its affine scaling code steps a
    double through the row; no formula of ours could promise its every rounding)."""
    row = Image.fromarray(np.arange(in_size, dtype=np.int32)[None, :], mode="I")
    picked = np.asarray(row.resize((out_size, 1), Image.Resampling.NEAREST))[0]
    return picked.astype(np.int32)


def _frozen(c: Coefficients) -> Coefficients:
    c.first.setflags(write=False)  # cached: shared by every caller
    c.weights.setflags(write=False)
    return c


@functools.lru_cache(maxsize=64)
def _dense_on(device: torch.device, in_size: int, out_size: int, interpolation: str):
    return torch.from_numpy(coefficients(in_size, out_size, interpolation).dense()).to(device)


# float64 elements of a pass held at once (64 MiB): batches are resized a slice at a time.
_PASS_ELEMENTS = 2**23


def resize_uint8(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(B, C, h, w) uint8 -> uint8 (B, C, *size): PIL's resize of every image, on any device.

    Each pass is a float64 matrix product with the weights over 2**22. Every term is an
    integer (pixel times weight, below 2**31 in magnitude) times 2**-22, and so is every
    partial sum (PIL's own int32 sums never overflow), so all of them are exact in float64
    (53 bits) in any order; ``floor(s + 0.5)`` is then PIL's round-shift and the clamp its
    clip8. An axis of the same size is copied, as PIL does.
    """
    x = images
    for dim in pass_order(tuple(images.shape[-2:]), size):
        x = _pass(x, dim, size[dim], interpolation)
    return x if x is not images else x.clone()


_PILLOW = tuple(int(v) for v in PIL.__version__.split(".")[:2])


def pass_order(shape: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """The axes PIL resizes, in its order (-1: width, -2: height): width first, except that
    Pillow 13 runs the height first when it shrinks more than twice as much as the width
    (ImagingResampleInner). Square images grown on the device go width first in every
    Pillow."""
    (h, w), (out_h, out_w) = shape, size
    height_first = _PILLOW >= (13, 0) and 0 < h - out_h and h - out_h > (w - out_w) * 2
    order = [-2, -1] if height_first else [-1, -2]
    return [dim for dim in order if shape[dim] != size[dim]]


def _pass(x: torch.Tensor, dim: int, n_out: int, interpolation: str) -> torch.Tensor:
    n_in = x.shape[dim]
    m = _dense_on(x.device, n_in, n_out, interpolation)  # (n_out, n_in)
    shape = list(x.shape)
    shape[dim] = n_out
    out = torch.empty(shape, dtype=torch.uint8, device=x.device)
    per_image = math.prod(shape[1:])
    step = max(1, _PASS_ELEMENTS // per_image)
    for i in range(0, len(x), step):
        xs = x[i : i + step].to(torch.float64)
        s = xs @ m.T if dim == -1 else m @ xs
        out[i : i + step] = s.add_(0.5).clamp_(0, 255)  # truncation = floor, >= 0
    return out


_POOL = None


def pil_resize(images: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(B, C, h, w) uint8 on the CPU -> uint8 (B, C, *size) laid out channels_last: PIL's
    resize, by PIL itself, on as many threads as torch uses (PIL releases the GIL while it
    resizes). On the CPU this is the fastest exact path: 0.7 s for 1024 CIFAR images at 224
    on 2 cores, where the float64 products take 1.8 s (BENCHMARKS.md, resize)."""
    global _POOL
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, torch.get_num_threads())
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = ThreadPoolExecutor(threads, thread_name_prefix="featcache-resize")
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # (B, h, w, C): PIL's layout
    out = np.empty((len(hwc), size[0], size[1], hwc.shape[-1]), np.uint8)
    resample = FILTERS[interpolation][2]

    def one(i: int) -> None:
        out[i] = np.asarray(Image.fromarray(hwc[i]).resize(size[::-1], resample))

    list(_POOL.map(one, range(len(hwc))))
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides

"""PIL's resize on CUDA at memory speed: two Triton kernels doing PIL's int32 arithmetic.

``resize_uint8`` (pil.py) is exact on every device but makes float64 products; on a GPU the
work is memory traffic, so these kernels read the uint8 pixels once per tap from cache and
write each output once. The width pass writes uint8 (as PIL's intermediate image); the height
pass does the same sums, then normalises (``(v - mean) * scale`` in float32, the operations of
the portable path) and writes the model's float32 input in any layout (``channels_last``).

Exactness: the sums are PIL's own, ``2**21 + sum(pixel * K)`` in int32 (which PIL's weights
never overflow), followed by an arithmetic shift by 22 and a clamp to 0..255: the same
integers in the same type as Resample.c. Taps past the pixels PIL reads carry weight 0 and
read a clamped, in-bounds pixel. Tested against PIL through Triton's interpreter on the CPU
(tests/test_preprocessing.py).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from featcache.preprocessing.pil import HALF, PRECISION_BITS, coefficients, pass_order


@triton.jit
def _width_pass(
    src, dst, first, weights, n_rows, in_w, out_w,
    TAPS: tl.constexpr, ROUND: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """uint8 (n_rows, in_w) -> uint8 (n_rows, out_w): one PIL pass along rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # (W,)
    row_ok, col_ok = rows < n_rows, cols < out_w
    mask = row_ok[:, None] & col_ok[None, :]  # (R, W)
    start = tl.load(first + cols, mask=col_ok, other=0)
    line = rows.to(tl.int64)[:, None] * in_w  # (R, 1)
    acc = tl.full((BLOCK_R, BLOCK_W), ROUND, tl.int32)
    for t in tl.static_range(TAPS):
        k = tl.load(weights + cols * TAPS + t, mask=col_ok, other=0)  # (W,)
        idx = tl.minimum(start + t, in_w - 1)
        p = tl.load(src + line + idx[None, :], mask=mask, other=0)
        acc += p.to(tl.int32) * k[None, :]
    v = tl.minimum(tl.maximum(acc >> SHIFT, 0), 255)
    tl.store(dst + rows.to(tl.int64)[:, None] * out_w + cols[None, :], v.to(tl.uint8), mask=mask)


@triton.jit
def _height_pass_normalise(
    src, dst, first, weights, mean, scale, in_h, out_h, width,
    stride_b, stride_c, stride_h, stride_w,
    CHANNELS: tl.constexpr, TAPS: tl.constexpr, ROUND: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """uint8 (B, C, in_h, width) -> normalised float32 (B, C, out_h, width) at any strides:
    one PIL pass along columns, for a block of output rows and columns of image
    ``program_id(0)``."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (H,) output rows
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)  # (W,)
    row_ok, col_ok = rows < out_h, cols < width
    mask = row_ok[:, None] & col_ok[None, :]  # (H, W)
    start = tl.load(first + rows, mask=row_ok, other=0)
    for c in tl.static_range(CHANNELS):
        plane = (b * CHANNELS + c).to(tl.int64) * in_h
        acc = tl.full((BLOCK_H, BLOCK_W), ROUND, tl.int32)
        for t in tl.static_range(TAPS):
            k = tl.load(weights + rows * TAPS + t, mask=row_ok, other=0)  # (H,)
            line = (plane + tl.minimum(start + t, in_h - 1)) * width  # (H,)
            p = tl.load(src + line[:, None] + cols[None, :], mask=mask, other=0)
            acc += p.to(tl.int32) * k[:, None]
        v = tl.minimum(tl.maximum(acc >> SHIFT, 0), 255).to(tl.float32)
        y = (v - tl.load(mean + c)) * tl.load(scale + c)
        out = b.to(tl.int64) * stride_b + c * stride_c + rows[:, None] * stride_h
        tl.store(dst + out + cols[None, :] * stride_w, y, mask=mask)


def supports(shape: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether the kernels make PIL's images for this resize: any that goes width first (every
    upscale of a square)."""
    return pass_order(shape, size)[:1] != [-2]


_TABLES: dict = {}


def _table(device, n_in: int, n_out: int, interpolation: str):
    """(first (out,) int32, weights (out, taps) int32) on the device, cached."""
    key = (device, n_in, n_out, interpolation)
    if key not in _TABLES:
        if n_in == n_out:  # an axis PIL leaves alone: one weight of 2**22 copies the pixel
            first, weights = torch.arange(n_out, dtype=torch.int32), torch.full((n_out, 1), 1 << 22)
        else:
            c = coefficients(n_in, n_out, interpolation)
            first, weights = torch.from_numpy(c.first.copy()), torch.from_numpy(c.weights.copy())
        _TABLES[key] = (first.to(device), weights.to(device, torch.int32).contiguous())
    return _TABLES[key]


def resize_normalise(
    images: torch.Tensor,
    size: tuple[int, int],
    interpolation: str,
    mean: torch.Tensor,
    scale: torch.Tensor,
    memory_format: torch.memory_format,
) -> torch.Tensor:
    """uint8 (B, C, h, w) -> normalised float32 (B, C, *size) in ``memory_format``: PIL's
    resize (``supports`` must hold), then ``(v - mean) * scale`` per channel."""
    # Launched on the images' GPU, whichever is current (the CPU under TRITON_INTERPRET).
    gpu = torch.cuda.device(images.device) if images.is_cuda else contextlib.nullcontext()
    with gpu:
        return _resize_normalise(images, size, interpolation, mean, scale, memory_format)


def _resize_normalise(images, size, interpolation, mean, scale, memory_format):
    x = images.contiguous()
    b, c, h, w = x.shape
    out_h, out_w = size
    consts = dict(ROUND=HALF, SHIFT=PRECISION_BITS)
    if w != out_w:
        first, weights = _table(x.device, w, out_w, interpolation)
        rows = torch.empty(b, c, h, out_w, dtype=torch.uint8, device=x.device)
        grid = (triton.cdiv(b * c * h, 16), triton.cdiv(out_w, 64))
        _width_pass[grid](
            x, rows, first, weights, b * c * h, w, out_w,
            TAPS=weights.shape[1], BLOCK_R=16, BLOCK_W=64, **consts,
        )  # fmt: skip
        x = rows
    out = torch.empty(b, c, out_h, out_w, device=x.device).contiguous(memory_format=memory_format)
    first, weights = _table(x.device, h, out_h, interpolation)
    grid = (b, triton.cdiv(out_h, 16), triton.cdiv(out_w, 64))
    _height_pass_normalise[grid](
        x, out, first, weights, mean, scale, h, out_h, out_w, *out.stride(),
        CHANNELS=c, TAPS=weights.shape[1], BLOCK_H=16, BLOCK_W=64, **consts,
    )  # fmt: skip
    return out

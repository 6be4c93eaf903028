"""Image augmentations applied to whole batches on the torch device.

Every random choice of an image comes from one row of uniforms ``u`` (B, N_PARAMS), so the
same image gets the same view whatever batch it is in: SimCLR draws the rows from a torch
generator; cached views (``extract --views``) draw them from the sample id and view index, so
a resumed extraction reproduces them exactly.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featcache.errors import ArgumentError

N_PARAMS = 12  # uniforms consumed per image (fixed, whatever ops are enabled)
OPS = ("crop", "flip", "jitter", "rotate", "gray")


@dataclass(frozen=True)
class Augment:
    """Random resized crop, flip, colour jitter, rotation and grayscale, per image.

    Defaults are SimCLR's CIFAR augmentations (Chen et al. 2020, appendix B.9).
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # b, c, s, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    rotate_deg: float = 0.0  # uniform in [-rotate_deg, rotate_deg]

    @classmethod
    def from_ops(cls, ops: str) -> Augment:
        """Views for probing, e.g. ``"crop,flip,jitter,rotate"`` (milder crops than SimCLR)."""
        names = [o.strip() for o in ops.split(",") if o.strip()]
        unknown = sorted(set(names) - set(OPS))
        if unknown:
            raise ArgumentError(f"unknown augmentation {unknown}; choose from {', '.join(OPS)}")
        return cls(
            crop_scale=(0.25, 1.0) if "crop" in names else (1.0, 1.0),
            crop_ratio=(3 / 4, 4 / 3) if "crop" in names else (1.0, 1.0),
            flip_p=0.5 if "flip" in names else 0.0,
            jitter_p=0.8 if "jitter" in names else 0.0,
            gray_p=0.2 if "gray" in names else 0.0,
            rotate_deg=15.0 if "rotate" in names else 0.0,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def moves_pixels(self) -> bool:
        """Whether the crop, flip or rotation can change an image's geometry."""
        return (
            self.crop_scale != (1.0, 1.0)
            or self.crop_ratio != (1.0, 1.0)
            or self.flip_p > 0
            or self.rotate_deg > 0
        )

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] and uniforms (B, N_PARAMS) -> augmented, same shape."""
        b = len(x)
        u = u.to(x.device, torch.float32)

        # Random resized crop, flip and rotation as one affine resampling per image.
        lo, hi = self.crop_scale
        area = lo + (hi - lo) * u[:, 0]
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop side as a fraction of the image
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (u[:, 2] * 2 - 1) * (1 - w)  # crop centre in [-1, 1], the crop inside the image
        cy = (u[:, 3] * 2 - 1) * (1 - h)
        flip = torch.where(u[:, 4] < self.flip_p, -1.0, 1.0)
        angle = (u[:, 11] * 2 - 1) * math.radians(self.rotate_deg)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([w * flip * cos, -h * sin, cx], 1),
                torch.stack([w * flip * sin, h * cos, cy], 1),
            ],
            1,
        )  # (B, 2, 3)
        if self.moves_pixels:  # known without looking at theta (no device sync per batch)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(
                x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
            )

        # Colour jitter (brightness, contrast, saturation, hue), applied with jitter_p.
        if self.jitter_p > 0:
            bri, con, sat, hue = self.jitter

            def factor(s, col):
                return (1 - s + 2 * s * u[:, col]).view(b, 1, 1, 1)

            y = (x * factor(bri, 6)).clamp(0, 1)
            mean = gray(y).mean(dim=(2, 3), keepdim=True)
            y = (mean + factor(con, 7) * (y - mean)).clamp(0, 1)
            g = gray(y)
            y = (g + factor(sat, 8) * (y - g)).clamp(0, 1)
            y = hue_shift(y, (u[:, 9] * 2 - 1) * hue)
            x = torch.where((u[:, 5] < self.jitter_p).view(b, 1, 1, 1), y, x)

        if self.gray_p > 0:
            to_gray = (u[:, 10] < self.gray_p).view(b, 1, 1, 1)
            x = torch.where(to_gray, gray(x).expand_as(x), x)
        return x


def view_uniforms(seed: int, ids: list[str], view: int) -> torch.Tensor:
    """(B, N_PARAMS) uniforms that depend only on (seed, sample id, view)."""
    rows = [
        np.random.default_rng([seed, zlib.crc32(i.encode()), view]).random(N_PARAMS) for i in ids
    ]
    return torch.from_numpy(np.stack(rows)).float()


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W), ITU-R 601 weights as torchvision's rgb_to_grayscale."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (per image, in [-0.5, 0.5]) through HSV."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    v, delta = maxc, maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-8)
    h = torch.where(
        maxc == r, ((g - b) / dc) % 6, torch.where(maxc == g, (b - r) / dc + 2, (r - g) / dc + 4)
    )
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6)
    f = h * 6 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long()[:, None] % 6  # (B, 1, H, W)

    def pick(*candidates):
        return torch.stack(candidates, 1).gather(1, i).squeeze(1)

    return torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], 1)

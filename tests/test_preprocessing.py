"""Preprocessing: PIL's images bit for bit on every path, the recipes' crops, normalisation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.preprocessing import Preprocess, to_rgb
from featcache.preprocessing.pil import FILTERS, INTERPOLATIONS, coefficients, resize_uint8

P = Preprocess(224, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=0.875)

# Up, down, non-square, one-axis, 1-pixel and PIL's height-first resizes.
CASES = [
    ((32, 32), (224, 224)), ((28, 28), (224, 224)), ((96, 96), (518, 518)), ((1, 1), (5, 5)),
    ((7, 3), (13, 13)), ((24, 40), (224, 100)), ((224, 224), (32, 32)), ((32, 32), (32, 64)),
    ((300, 200), (224, 224)), ((90, 30), (20, 32)), ((40, 40), (40, 40)),
]  # fmt: skip


def random_cases(n: int, largest: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [((int(a), int(b)), (int(c), int(d))) for a, b, c, d in rng.integers(1, largest, (n, 4))]


def images(shape, seed=0, n=2):
    """Random uint8 images, the first of saturated pixels only (the filters overshoot)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 3, *shape), dtype=np.uint8)
    x[0] = np.where(rng.random((3, *shape)) < 0.5, 0, 255)
    return torch.from_numpy(x)


def pil_resize(x: torch.Tensor, size, interpolation: str) -> torch.Tensor:
    """The reference: PIL's Image.resize of every image."""
    resample = FILTERS[interpolation][2]
    out = [np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize(size[::-1], resample))
           for im in x]  # fmt: skip
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_8bit_rgb(mode):
    img = Image.new(mode, (5, 4))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (5, 4)


def test_16bit_range_maps_onto_8bit():
    img = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert img.mode == "I;16"
    assert np.asarray(to_rgb(img)).max() == 255
    half = Image.fromarray(np.full((2, 2), 32896, np.uint16))
    assert np.asarray(to_rgb(half))[0, 0, 0] == 128


def test_small_square_images_stay_native_for_the_device():
    arr = P.prepare(Image.new("RGB", (32, 32), (10, 20, 30)))
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("shape, size", CASES + random_cases(200, 80))
def test_resize_uint8_is_pils_resize(interpolation, shape, size):
    x = images(shape, seed=shape[0] * 1000 + shape[1])
    assert torch.equal(resize_uint8(x, size, interpolation), pil_resize(x, size, interpolation))


def test_pil_resize_on_several_threads_is_pils_image_by_image():
    """The thread pool (one thread per torch thread; under `make test` a worker has one)."""
    from featcache.preprocessing.pil import FILTERS

    x = images((20, 28), n=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got = pil_resize(x, (50, 40), "bicubic")
    finally:
        torch.set_num_threads(threads)
    for i in range(len(x)):
        one = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((40, 50), FILTERS["bicubic"][2])
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), np.asarray(one))


def test_resize_uint8_in_slices_is_the_same(monkeypatch):
    """Batches are resized a slice at a time (the bound on float64 elements)."""
    from featcache.preprocessing import pil

    x = images((32, 32), n=5)
    whole = resize_uint8(x, (224, 224), "bicubic")
    monkeypatch.setattr(pil, "_PASS_ELEMENTS", 1)
    assert torch.equal(resize_uint8(x, (224, 224), "bicubic"), whole)
    assert torch.equal(whole, pil_resize(x, (224, 224), "bicubic"))


def test_coefficients_are_pils_published_bicubic():
    """Hand-checkable: 2x upscale, PIL's a = -0.5 (torch's interpolate uses -0.75). The output
    pixel 1 sits at source 0.75 - 0.5 = 0.25: taps at -1..2 (the first clamped away)."""
    c = coefficients(4, 8, "bicubic")
    w = [((-0.5 + 2) * t - (-0.5 + 3)) * t * t + 1 if t < 1 else (((t - 5) * t + 8) * t - 4) * -0.5
         for t in (1.25, 0.25, 0.75, 1.75)]  # fmt: skip
    w = np.array(w[1:]) / sum(w[1:])  # the tap before pixel 0 is outside: renormalised
    assert c.first[1] == 0
    assert list(c.weights[1, :3]) == [int(v * 2**22 + (0.5 if v >= 0 else -0.5)) for v in w]


def test_nearest_takes_pils_source_pixels():
    """PIL picks floor((i + 0.5) * 7 / 10); torch's legacy nearest floor(i * 7 / 10)."""
    x = torch.arange(7, dtype=torch.uint8).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = resize_uint8(x, (1, 10), "nearest")[0, 0, 0].tolist()
    assert out == pil_resize(x, (1, 10), "nearest")[0, 0, 0].tolist()
    assert out == [0, 1, 1, 2, 3, 3, 4, 5, 5, 6]
    torch_nearest = torch.nn.functional.interpolate(x, size=(1, 10), mode="nearest")
    assert torch_nearest[0, 0, 0].tolist() != out


def test_the_model_input_is_pils_image_normalised():
    q = Preprocess(64, "bicubic", (0.1, 0.2, 0.3), (0.5, 0.25, 0.2), crop_pct=1.0)
    x = images((32, 32))
    y = q(x, torch.channels_last)
    assert y.shape == (2, 3, 64, 64) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = pil_resize(x, (64, 64), "bicubic").float()
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(y, (ref - mean) / std, rtol=0, atol=1e-6)
    assert torch.equal(q(x), y)  # the layout changes no value


def test_float_images_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        P(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("recipe", ["torchvision", "transformers"])
@pytest.mark.parametrize("size", [(641, 479), (480, 639), (300, 300), (227, 500), (20, 50)])
def test_photos_get_their_recipes_resize_and_crop(recipe, size):
    """timm's and DINO's eval transform (torchvision Resize + CenterCrop), or transformers'
    image processor (its shortest-edge resize and centre crop), to the pixel."""
    rng = np.random.default_rng(sum(size))
    photo = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    q = Preprocess(224, "bicubic", (0.5,) * 3, (0.5,) * 3, crop_pct=0.875, recipe=recipe)
    got = q.prepare(photo)
    if recipe == "torchvision":
        from torchvision import transforms

        t = transforms.Compose([transforms.Resize(256, transforms.InterpolationMode.BICUBIC),
                                transforms.CenterCrop(224)])  # fmt: skip
        want = np.asarray(t(photo))
    else:
        from transformers.image_processing_utils import get_size_dict  # noqa: F401
        from transformers.image_transforms import center_crop, get_resize_output_image_size, resize
        from transformers.image_utils import PILImageResampling, get_image_size

        arr = np.asarray(photo)
        out = get_resize_output_image_size(arr, 256, default_to_square=False)
        arr = resize(arr, out, resample=PILImageResampling.BICUBIC)
        want = center_crop(arr, (224, 224))
        assert get_image_size(want) == (224, 224)
    assert got.shape == (224, 224, 3) and np.array_equal(got, want)


_FORCED_CUDA_PATH = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"  # Triton's interpreter: the CUDA kernels on the CPU
import numpy as np, torch
from featcache import preprocessing
from featcache.preprocessing import Preprocess, triton_kernels
from featcache.preprocessing.pil import FILTERS
from PIL import Image
preprocessing.resize_kernel = lambda device: "triton"  # the path CUDA takes
calls = []
kernel = triton_kernels.resize_normalise
triton_kernels.resize_normalise = lambda *a: calls.append(1) or kernel(*a)
bad = []
for interp, h, s in json.loads(sys.argv[1]):
    q = Preprocess(s, interp, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), crop_pct=1.0)
    rng = np.random.default_rng(h * 100 + s)
    x = torch.from_numpy(rng.integers(0, 256, (1, 3, h, h), dtype=np.uint8))
    ref = Image.fromarray(x[0].permute(1, 2, 0).numpy()).resize((s, s), FILTERS[interp][2])
    ref = np.asarray(ref)
    ref = torch.from_numpy(ref).permute(2, 0, 1)[None]
    mean = torch.tensor(q.mean).view(1, 3, 1, 1) * 255
    scale = 1 / (torch.tensor(q.std).view(1, 3, 1, 1) * 255)
    y = q(x, torch.channels_last)
    same = torch.equal(y, (ref - mean) * scale)
    if not (same and y.is_contiguous(memory_format=torch.channels_last)):
        bad.append([interp, h, s])
print(json.dumps({"bad": bad, "kernel_calls": len(calls)}))
"""


def test_the_cuda_path_forced_on_the_cpu_makes_pils_images():
    """The Triton kernels CUDA runs, through Triton's interpreter (slow: small images): PIL's
    images, normalised and laid out channels_last. The device resizes squares up to the
    input size: CIFAR's to 224 with the registry's filters, the fixed squares and 200
    random ones with every filter in turn."""
    pytest.importorskip("triton")
    rng = np.random.default_rng(3)
    fixed = [(h, s) for (h, w), (s, t) in CASES if h == w and s == t and s >= h and s <= 64]
    cases = [[f, 32, 224] for f in ("bilinear", "bicubic")]
    cases += [[f, h, s] for f in INTERPOLATIONS for h, s in fixed]
    cases += [[INTERPOLATIONS[i % len(INTERPOLATIONS)], int(n), int(n + d)]
              for i, (n, d) in enumerate(rng.integers(1, 16, (200, 2)))]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-c", _FORCED_CUDA_PATH, json.dumps(cases)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"bad": [], "kernel_calls": len(cases)}

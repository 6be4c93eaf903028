import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featcache.extraction.preprocess import Preprocess, to_rgb

P = Preprocess(
    input_size=224,
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    crop_pct=0.875,
)


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


def test_large_and_non_square_photos_get_resize_and_centre_crop():
    wide = Image.new("RGB", (640, 480))
    assert P.prepare(wide).shape == (224, 224, 3)
    tall_small = Image.new("RGB", (20, 50))
    assert P.prepare(tall_small).shape == (224, 224, 3)


def test_centre_crop_keeps_the_centre():
    arr = np.zeros((300, 600, 3), np.uint8)
    arr[:, 250:350] = 255  # a bright vertical bar in the middle
    out = P.prepare(Image.fromarray(arr))
    assert out[:, 112].mean() > 200 and out[:, 0].mean() < 10


def test_device_upscale_interpolates_with_the_entry_mode_and_never_pads():
    """A random image, not a constant one: the two modes differ, and each gives exactly the
    interpolation of the whole image (padding or a crop would change the border)."""
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), np.uint8))
    out = {}
    for mode in ("bilinear", "bicubic"):
        q = Preprocess(224, mode, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=0.875)
        y = q(x)
        assert y.shape == (2, 3, 224, 224) and y.dtype == torch.float32
        pixels = y * (0.25 * 255) + 0.5 * 255
        reference = F.interpolate(x.float(), size=(224, 224), mode=mode, align_corners=False)
        # Within one grey level of the float interpolation (uint8 rounds), bicubic's saturated
        # overshoots (its horizontal pass is kept in 0..255) aside.
        inside = (reference >= 0) & (reference <= 255)
        if mode == "bilinear":
            assert (pixels - reference).abs().max() <= 1 + 1e-3
        assert ((pixels - reference).abs() <= 1 + 1e-3)[inside].float().mean() > 0.95
        out[mode] = pixels
    assert (out["bilinear"] - out["bicubic"]).abs().max() > 10  # the mode is the entry's


def test_normalisation_uses_the_entry_mean_and_std():
    q = Preprocess(
        input_size=2,
        interpolation="bilinear",
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.5, 0.5),
        crop_pct=1.0,
    )
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    y = q(x)[0, :, 0, 0]
    torch.testing.assert_close(y, torch.tensor([-0.2, 1.6, -0.2]), atol=1e-5, rtol=0)


def _bytes_only_on_cpu(monkeypatch):
    """Make the CPU behave like CUDA: no uint8 interpolate kernels (they raise there)."""
    import torch.nn.functional as F

    from featcache.extraction import preprocess

    interpolate = F.interpolate

    def float_only(x, *args, **kwargs):
        if x.dtype == torch.uint8:
            raise NotImplementedError("\"upsample_bicubic2d_out_frame\" not implemented for 'Byte'")
        return interpolate(x, *args, **kwargs)

    monkeypatch.setattr(preprocess, "native_uint8_resize", lambda device: False)
    monkeypatch.setattr(F, "interpolate", float_only)


def test_uint8_kernels_are_used_only_where_they_exist():
    """The CPU has them for every interpolation the registry uses (were one dropped by a torch
    release, this fails rather than the extraction); CUDA has none."""
    import torch.nn.functional as F

    from featcache.backbones import available_backbones, get_spec
    from featcache.device import native_uint8_resize

    assert native_uint8_resize(torch.device("cpu"))
    x = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    for mode in {get_spec(name).interpolation for name in available_backbones()}:
        y = F.interpolate(x, size=(12, 12), mode=mode, align_corners=False)
        assert y.dtype == torch.uint8 and y.shape == (1, 3, 12, 12), mode
    assert not native_uint8_resize(torch.device("cuda"))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_devices_without_uint8_kernels_make_the_same_images(monkeypatch, interpolation):
    """Where uint8 kernels are missing (CUDA), the images are the CPU kernels' bit for bit:
    a real network's features move by up to 1% (cosine 0.9906 for Lite0 on CIFAR) when 15% of
    the pixels are off by one grey level, as the float interpolation left them."""
    q = Preprocess(224, interpolation, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=0.875)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    x[0] = torch.from_numpy(np.where(rng.random((3, 32, 32)) < 0.5, 0, 255).astype(np.uint8))
    native = q(x)
    _bytes_only_on_cpu(monkeypatch)
    portable = q(x)
    assert portable.dtype == torch.float32 and torch.equal(portable, native)
    assert x.dtype == torch.uint8  # the caller's batch is untouched


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    "shape, size",
    [((32, 32), (224, 224)), ((28, 28), (224, 224)), ((96, 96), (518, 518)), ((1, 1), (5, 5)),
     ((7, 3), (13, 13)), ((24, 40), (224, 100)), ((224, 224), (32, 32)), ((32, 32), (32, 64))],
)  # fmt: skip
def test_resize_uint8_is_the_cpu_kernel(monkeypatch, interpolation, shape, size):
    """Up, down, non-square and one-axis resizes, with saturated pixels (bicubic overshoots);
    the whole batch at once and one image at a time (its bound on float64 elements)."""
    from featcache.extraction import preprocess

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 256, (4, 3, *shape), dtype=np.uint8))
    x[0] = torch.from_numpy(np.where(rng.random((3, *shape)) < 0.5, 0, 255).astype(np.uint8))
    expected = F.interpolate(x, size=size, mode=interpolation, align_corners=False).float()
    assert torch.equal(preprocess.resize_uint8(x, size, interpolation), expected)
    monkeypatch.setattr(preprocess, "_RESIZE_ELEMENTS", 1)
    assert torch.equal(preprocess.resize_uint8(x, size, interpolation), expected)

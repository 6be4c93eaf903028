import numpy as np
import pytest
import torch
from PIL import Image

from featcache.preprocess import Preprocess, to_rgb

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


def test_device_upscale_interpolates_never_pads():
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    y = P(x)
    assert y.shape == (2, 3, 224, 224) and y.dtype == torch.float32
    # A constant image stays constant everywhere (padding would leave a border).
    expected = (128 / 255 - 0.5) / 0.25
    torch.testing.assert_close(y, torch.full_like(y, expected), atol=1e-5, rtol=0)


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

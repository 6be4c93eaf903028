import pytest
import torch

from featcache.preprocessing.augment import N_PARAMS, Augment, hue_shift, view_uniforms

NONE = dict(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0, jitter_p=0, gray_p=0)


def test_same_uniforms_same_views_whatever_the_batch():
    x = torch.rand(6, 3, 32, 32)
    u = torch.rand(6, N_PARAMS, generator=torch.Generator().manual_seed(1))
    a = Augment()(x, u)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(Augment()(x[2:4], u[2:4]), a[2:4])  # per image, not per batch
    assert not torch.allclose(a, x)


def test_each_op_alone():
    x = torch.rand(4, 3, 32, 32)
    u = torch.rand(4, N_PARAMS)
    torch.testing.assert_close(Augment(**NONE)(x, u), x, atol=1e-5, rtol=0)
    flipped = Augment(**{**NONE, "flip_p": 1})(x, u)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)
    g = Augment(**{**NONE, "gray_p": 1})(x, u)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    rotated = Augment(**{**NONE, "rotate_deg": 30})(x, u)
    assert not torch.allclose(rotated, x)


def test_crop_alone_is_a_resized_crop():
    """A centred crop of half the side (a quarter of the area, square) is the middle of the
    image upsampled twice, bilinear (its border pixels blend in the pixels beside the crop,
    as a crop of the continuous image does)."""
    x = torch.rand(2, 3, 32, 32)
    u = torch.full((2, N_PARAMS), 0.5)  # crop centred, no flip
    crop = Augment(**{**NONE, "crop_scale": (0.25, 0.25)})(x, u)
    twice = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    want = twice[:, :, 16:48, 16:48]
    torch.testing.assert_close(crop, want, atol=1e-5, rtol=0)


def test_jitter_alone_scales_brightness_by_its_uniform():
    """Brightness only: each image times 1 - 0.4 + 0.8 u, clipped to [0, 1]."""
    x = torch.rand(3, 3, 8, 8)
    u = torch.rand(3, N_PARAMS)
    u[:, 5] = 0.0  # below jitter_p: every image jittered
    out = Augment(**{**NONE, "jitter_p": 1.0, "jitter": (0.4, 0, 0, 0)})(x, u)
    factor = (0.6 + 0.8 * u[:, 6]).view(3, 1, 1, 1)
    torch.testing.assert_close(out, (x * factor).clamp(0, 1), atol=1e-5, rtol=0)


def test_hue_shift_by_hand():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(hue_shift(x, torch.zeros(2)), x, atol=1e-5, rtol=0)
    red = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    green = hue_shift(red, torch.tensor([1 / 3]))
    torch.testing.assert_close(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5, rtol=0)


def test_view_uniforms_depend_on_id_and_view_only():
    a = view_uniforms(0, ["cat/1.png", "dog/2.png"], view=1)
    b = view_uniforms(0, ["dog/2.png"], view=1)
    torch.testing.assert_close(a[1:], b)
    assert not torch.equal(a, view_uniforms(0, ["cat/1.png", "dog/2.png"], view=2))
    assert a.shape == (2, N_PARAMS) and 0 <= float(a.min()) and float(a.max()) < 1


def test_from_ops_validates_names():
    aug = Augment.from_ops("crop,flip,jitter,rotate")
    assert aug.rotate_deg > 0 and aug.flip_p == 0.5 and aug.gray_p == 0
    assert Augment.from_ops("flip").crop_scale == (1.0, 1.0)
    with pytest.raises(ValueError, match="unknown augmentation"):
        Augment.from_ops("crop,blur")

"""Every entry's features are those of its own recipe: featcache's model input equals the
recipe's (to float rounding) and the stored features have cosine >= 0.9999 per image.

Small squares (CIFAR) are resized straight to the input size by PIL with the entry's filter
and normalised with its mean and std; photos (non-square, larger) get the entry's own eval
transform: timm's (torchvision Resize + CenterCrop) for timm entries, DINO's (the same, with
the entry's filter) for the ViT hub entries, the image processor's (its PIL backend) for
transformers entries. Random weights of the real architectures, offline.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.backbones import available_backbones, get_spec, load_backbone
from featcache.extraction.extract import ExtractConfig, extract
from featcache.preprocessing.pil import FILTERS
from featcache.store import Store

ENTRIES = [n for n in available_backbones() if n != "test-tiny"]
PHOTOS = {"wide": (301, 200), "large": (260, 260), "tall": (150, 233)}  # (width, height)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train: two CIFAR-sized squares; test: three photos that need the CPU's crop."""
    root = tmp_path_factory.mktemp("recipes")
    rng = np.random.default_rng(0)
    for split, sizes in (("train", {"a": (32, 32), "b": (32, 32)}), ("test", PHOTOS)):
        (root / split / "c").mkdir(parents=True)
        for name, (w, h) in sizes.items():
            # Smooth images with detail, as photos are: a gradient plus noise.
            base = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None]
            arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / split / "c" / f"{name}.png")
    return root


def _tensor(images: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, np.float32) for i in images])).permute(
        0, 3, 1, 2
    )


def _normalise(x: torch.Tensor, spec) -> torch.Tensor:
    """ToTensor + Normalize: the recipes' own arithmetic."""
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


def _recipe(name: str, spec, weights, photos: list[Image.Image]) -> torch.Tensor:
    """The model input the entry's own eval transform makes of photos."""
    if spec.recipe == "transformers":
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(weights, backend="pil")
        return processor(images=photos, return_tensors="pt")["pixel_values"]
    from torchvision import transforms

    if spec.family.startswith("timm"):
        import timm

        with torch.device("meta"):
            model = timm.create_model(spec.arch["timm_name"], pretrained=False)
        t = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    else:  # DINO's eval transform with the entry's filter, mean and std
        mode = transforms.InterpolationMode(spec.interpolation)
        t = transforms.Compose([
            transforms.Resize(int(spec.input_size / spec.crop_pct), mode),
            transforms.CenterCrop(spec.input_size),
            transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
        ])  # fmt: skip
    return torch.stack([t(p) for p in photos])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize("name", ENTRIES)
def test_features_are_those_of_the_entrys_own_recipe(name, folder, tmp_path, random_weights):
    weights = random_weights(name)
    model, preprocess = load_backbone(name, weights)
    spec = model.spec
    store = Store(extract(ExtractConfig(
        backbone=name, weights=str(weights) if weights else None,
        dataset=f"imagefolder:{folder}", out=str(tmp_path / "s.h5"), workers=0,
        precision="fp32", progress=False,
    )).path)  # fmt: skip
    for split in ("train", "test"):
        ids = store.read(split, "ids").tolist()
        images = [Image.open(folder / split / i).convert("RGB") for i in ids]
        ours = torch.from_numpy(np.stack([preprocess.prepare(i) for i in images]))
        ours = preprocess(ours.permute(0, 3, 1, 2).contiguous())
        if split == "train":  # PIL to the input size, normalised
            size = (spec.input_size, spec.input_size)
            resized = [i.resize(size, FILTERS[spec.interpolation][2]) for i in images]
            theirs = _normalise(_tensor(resized), spec)
        else:
            theirs = _recipe(name, spec, weights, images)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)  # the same pixels
        with torch.inference_mode():
            reference = model(theirs)
        for feature, _ in spec.features:
            stored = torch.from_numpy(store.load(split, feature).features)
            cos = _cosine(stored, reference[feature])
            assert cos.min() >= 0.9999, (split, feature, cos.tolist())


def test_vit_b16_crops_where_its_processor_squashes(folder, tmp_path):
    """The README's named departure: transformers' ViTImageProcessor squashes photos to a
    square; featcache crops the centre as DINO's evaluation does (square images agree)."""
    from transformers import ViTImageProcessorPil as ViTImageProcessor

    spec = get_spec("vit-b16")
    processor = ViTImageProcessor(size={"height": 224, "width": 224}, resample=2,
                                  image_mean=list(spec.mean), image_std=list(spec.std))  # fmt: skip
    wide = Image.open(folder / "test" / "c" / "wide.png").convert("RGB")
    large = Image.open(folder / "test" / "c" / "large.png").convert("RGB")
    pre = spec.preprocess()

    def ours(img):
        return pre(torch.from_numpy(pre.prepare(img)).permute(2, 0, 1)[None].contiguous())

    def squashed(img):
        return processor(images=[img], return_tensors="pt")["pixel_values"]

    assert (ours(wide) - squashed(wide)).abs().max() > 0.5  # other pixels: a crop, not a squash
    square = large.resize((224, 224), Image.Resampling.BILINEAR)
    torch.testing.assert_close(ours(square), squashed(square), atol=2e-5, rtol=0)

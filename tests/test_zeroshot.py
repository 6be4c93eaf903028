"""featcache zeroshot: CLIP's zero-shot classification of a store's embed features, checked
against transformers' CLIPModel logits computed directly from the same images with a small
random CLIP saved locally (its tokenizer built offline)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_image_folder, tiny_config

import featcache
from featcache.cli import main
from featcache.errors import FeatcacheError
from featcache.extraction.extract import ExtractConfig, extract
from featcache.extraction.zeroshot import OPENAI_CIFAR, templates_of
from featcache.store import Store, zeroshot_path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tiny_clip(path, seed=0):
    """A random CLIPModel (32x32 images) with its image processor and a character-level
    tokenizer (CLIP's byte alphabet, no merges): what save_pretrained writes for a real one."""
    import transformers

    path.mkdir()
    vocab = _save_character_tokenizer(path)
    eos = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, eos_token_id=eos,
                bos_token_id=vocab["<|startoftext|>"], pad_token_id=eos)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(seed)
    transformers.CLIPModel(config).save_pretrained(path)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
        resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ).save_pretrained(path)  # fmt: skip
    return path


def _save_character_tokenizer(path) -> dict[str, int]:
    """CLIP's tokenizer with its byte alphabet and no merges (one token a character), saved
    in ``path``; returns its vocabulary."""
    import transformers

    chars = _byte_alphabet()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    return vocab


def _byte_alphabet() -> list[str]:
    """GPT-2's (and CLIP's) printable stand-in for each of the 256 bytes."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [table[b] for b in range(256)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    weights = _tiny_clip(root / "tiny-clip")
    folder = make_image_folder(root / "images", train=2, test=5)
    cfg = ExtractConfig(backbone="hf:tiny-clip", weights=str(weights),
                        dataset=f"imagefolder:{folder}", out=str(root / "clip.h5"), workers=0,
                        progress=False, precision="fp32")  # fmt: skip
    store = extract(cfg).path
    (root / "one.txt").write_text("a photo of a {c}.\n")
    return {"weights": weights, "folder": folder, "store": store, "root": root}


def test_scores_equal_clipmodels_logits_from_the_same_images(clip):
    import transformers
    from PIL import Image

    result = featcache.zeroshot(clip["store"], weights=str(clip["weights"]),
                                templates=str(clip["root"] / "one.txt"))  # fmt: skip
    store = Store(clip["store"])
    test = store.load("test", "embed")
    with np.load(zeroshot_path(store.path)) as saved:
        head, scale = saved["head"], float(saved["logit_scale"])
    x = test.features / np.linalg.norm(test.features, axis=1, keepdims=True)
    ours = scale * x @ head.T

    model = transformers.CLIPModel.from_pretrained(clip["weights"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip["weights"])
    images = np.stack([np.asarray(Image.open(clip["folder"] / "test" / i)) for i in test.ids])
    mean, std = (torch.tensor(v)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    texts = tokenizer([f"a photo of a {c}." for c in store.class_names], padding=True,
                      return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        ref = model(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                    pixel_values=pixels).logits_per_image.numpy()  # fmt: skip
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    assert result.top1 == pytest.approx(100 * (ref.argmax(1) == test.labels).mean())
    assert result.top5 == 100.0  # three classes
    assert result.data["templates"] == 1 and result.data["classnames"] == store.class_names
    assert result.data["scoring"] == "softmax" and "logit_bias" not in result.data


def test_clips_own_templates_and_the_command_line(clip, tmp_path):
    assert len(OPENAI_CIFAR) == 18 and templates_of("openai")[0] == "a photo of a {c}."
    args = ["zeroshot", "--store", str(clip["store"]), "--weights", str(clip["weights"]),
            "--json", str(tmp_path / "z.json")]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "zero-shot hf:tiny-clip (18 templates, test): top-1" in r.output
    saved = json.loads((tmp_path / "z.json").read_text())
    assert saved["kind"] == "zeroshot" and saved["features"] == "embed"
    table = CliRunner().invoke(main, ["table", str(tmp_path / "z.json")]).output
    assert "zero-shot top-1" in table.splitlines()[0]


def test_bad_input_is_a_clear_error(clip, tmp_path, image_folder):
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {c}.\na photo without the name.\n")
    with pytest.raises(Exception, match=r"every line is a template with \{c\}.*'a photo without"):
        featcache.zeroshot(clip["store"], weights=str(clip["weights"]), templates=str(bad))
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n")
    with pytest.raises(Exception, match="names 2 classes; the store has 3"):
        featcache.zeroshot(clip["store"], weights=str(clip["weights"]), classnames=str(names))
    other = _tiny_clip(tmp_path / "tiny-clip", seed=1)
    with pytest.raises(FeatcacheError, match="are not those .* was made with"):
        featcache.zeroshot(clip["store"], weights=str(other))
    tiny = extract(tiny_config(image_folder, tmp_path / "t.h5")).path
    with pytest.raises(FeatcacheError, match="no image embedding"):
        featcache.zeroshot(tiny)


def test_templates_are_averaged_as_clips_zeroshot_classifier_and_only_embed_is_scored(
    clip, monkeypatch
):
    """Several templates: each prompt's embedding normalised, averaged per class, normalised
    again (CLIP's zeroshot_classifier, transcribed with transformers' CLIPModel); the 9
    prompts through the text tower two at a time."""
    import transformers

    from featcache.extraction import zeroshot

    monkeypatch.setattr(zeroshot, "PROMPT_BATCH", 2)
    prompts = clip["root"] / "two.txt"
    prompts.write_text("a photo of a {c}.\nitap of a {c}.\na {c} in a video game.\n")
    featcache.zeroshot(clip["store"], weights=str(clip["weights"]), templates=str(prompts))
    store = Store(clip["store"])
    with np.load(zeroshot_path(store.path)) as saved:
        head = saved["head"]
    model = transformers.CLIPModel.from_pretrained(clip["weights"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip["weights"])
    ref = []
    for c in store.class_names:
        texts = [
            t.format(c=c) for t in ("a photo of a {c}.", "itap of a {c}.", "a {c} in a video game.")
        ]
        with torch.no_grad():
            e = model.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))
        e = getattr(e, "pooler_output", e)
        e = e / e.norm(dim=-1, keepdim=True)
        mean = e.mean(0)
        ref.append((mean / mean.norm()).numpy())
    np.testing.assert_allclose(head, np.stack(ref), atol=1e-5)
    with pytest.raises(FeatcacheError, match="'embed' feature set"):
        featcache.evaluate("zeroshot", clip["store"], features="cls", templates=str(prompts),
                           weights=str(clip["weights"]))  # fmt: skip


def _tiny_siglip(path):
    """A random SiglipModel (32x32 images) with a logit scale and bias of its own, its image
    processor, and CLIP's character-level tokenizer standing in for SigLIP's SentencePiece
    one (which needs a vocabulary file; only the ids differ)."""
    import math

    import transformers

    path.mkdir()
    vocab = _save_character_tokenizer(path)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=text, vision_config=vision)
    )
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.5)
    model.save_pretrained(path)
    transformers.SiglipImageProcessor(
        size={"height": 32, "width": 32}, resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(path)
    return path


def test_siglip_scores_equal_siglipmodels_logits_from_the_same_images(tmp_path):
    """SigLIP: its own text tower (texts padded to its 64 tokens, no attention mask, the last
    token through its head), each class scored by scale * cos + bias (the sigmoid's logit):
    transformers' SiglipModel called on the same images and texts gives the same logits."""
    import transformers
    from PIL import Image

    weights = _tiny_siglip(tmp_path / "tiny-siglip")
    folder = make_image_folder(tmp_path / "images", train=2, test=5)
    cfg = ExtractConfig(backbone="hf:tiny-siglip", weights=str(weights),
                        dataset=f"imagefolder:{folder}", out=str(tmp_path / "siglip.h5"),
                        workers=0, progress=False, precision="fp32")  # fmt: skip
    path = extract(cfg).path
    (tmp_path / "one.txt").write_text("a photo of a {c}.\n")
    result = featcache.zeroshot(path, weights=str(weights), templates=str(tmp_path / "one.txt"))
    store = Store(path)
    test = store.load("test", "embed")
    assert set(store.feature_sets) == {"embed", "patch_mean"}  # no CLS token in SigLIP
    with np.load(zeroshot_path(store.path)) as saved:
        head, scale, bias = saved["head"], float(saved["logit_scale"]), float(saved["logit_bias"])
    x = test.features / np.linalg.norm(test.features, axis=1, keepdims=True)
    ours = scale * x @ head.T + bias

    model = transformers.SiglipModel.from_pretrained(weights).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(weights)
    images = np.stack([np.asarray(Image.open(folder / "test" / i)) for i in test.ids])
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    texts = tokenizer([f"a photo of a {c}." for c in store.class_names], padding="max_length",
                      max_length=64, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        ref = model(input_ids=texts["input_ids"], pixel_values=pixels).logits_per_image.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    assert result.top1 == pytest.approx(100 * (ref.argmax(1) == test.labels).mean())
    assert result.data["scoring"] == "sigmoid"
    assert result.data["logit_scale"] == pytest.approx(10.0)
    assert result.data["logit_bias"] == pytest.approx(-2.5)


def test_siglip_2s_gemma_vocabulary_gets_the_lowercased_text_it_was_trained_on():
    """SigLIP 2 repos name a GemmaTokenizer, which keeps case; SigLIP 2 was trained on
    lowercased text (transformers' Siglip2Tokenizer lowercases): the prompts are lowercased."""
    import transformers

    from featcache.backbones.hf_models import TextTower

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.▁"
    special = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
    vocab = {t: i for i, t in enumerate((*special, *chars))}
    gemma = transformers.GemmaTokenizer(vocab=vocab, merges=[])
    assert gemma("A Cat")["input_ids"] != gemma("a cat")["input_ids"]
    text = transformers.SiglipTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    tower = TextTower(transformers.SiglipTextModel(text).eval(), gemma, 10.0, -2.5)
    torch.testing.assert_close(
        tower.embed(["A Photo of a CAT."]), tower.embed(["a photo of a cat."])
    )
    assert not torch.allclose(
        tower.embed(["a photo of a cat."]), tower.embed(["a photo of a dog."])
    )

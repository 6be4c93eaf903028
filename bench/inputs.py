"""The `inputs` section: webdataset shards against the same images as a folder, and the cost of
storing every layer.

- CIFAR-10's JPEGs (50,000 train in 10 shards, 10,000 test in 2) as webdataset shards holding
  the folder's own files, against the folder: `featcache extract` with ``bench-pool384`` (no
  model, so the input is what is timed), each run a fresh process, folder and shards
  alternating twice; rates from the run clock; features compared image by image.
- `--layers all` against the last layer alone on ViT-S/16 (random-vits16: DINO's architecture,
  random weights), the same images, fresh processes, alternating twice.

    python bench/run.py --only inputs [--quick]
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from pipeline import pipeline_child


def write_shards(folder: Path, root: Path, counts: dict[str, int]) -> Path:
    """The folder's images as CLIP_benchmark-style shards (key ``<class>/<stem>``, the file's
    bytes as ``jpg``, the class number as ``cls``); made once."""
    if (root / "classnames.txt").is_file():
        return root
    classes = sorted(p.name for p in (folder / "train").iterdir())
    tmp = root.with_name(root.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        files = [(c, f) for c, name in enumerate(classes)
                 for f in sorted((folder / split / name).iterdir())]  # fmt: skip
        (tmp / split).mkdir(exist_ok=True)
        per = -(-len(files) // count)
        for k in range(count):
            with tarfile.open(tmp / split / f"{k}.tar", "w") as tar:
                for c, f in files[k * per : (k + 1) * per]:
                    for ext, data in ((f.suffix[1:], f.read_bytes()), ("cls", str(c).encode())):
                        info = tarfile.TarInfo(f"{classes[c]}/{f.stem}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    (tmp / "classnames.txt").write_text("\n".join(classes) + "\n")
    tmp.rename(root)
    return root


def _extract(work: Path, name: str, backbone: str, dataset: str, *extra: str) -> dict:
    out, result = work / f"{name}.h5", work / f"{name}.json"
    out.unlink(missing_ok=True)
    pipeline_child("extract", "--backbone", backbone, "--dataset", dataset, "--out", str(out),
           "--no-progress", "--json", str(result), *extra)  # fmt: skip
    return {**json.loads(result.read_text()), "out": out}


def _same_features(folder_store: Path, shard_store: Path) -> tuple[int, float]:
    """(images compared, largest absolute difference) between the two stores, by image."""
    from featcache.store import Store

    a, b = Store(folder_store), Store(shard_store)
    images, worst = 0, 0.0
    for split in ("train", "test"):
        x, y = a.load(split, "pooled"), b.load(split, "pooled")
        row = {sid.rsplit(".", 1)[0]: k for k, sid in enumerate(x.ids)}
        order = [row[sid] for sid in y.ids]
        worst = max(worst, float(np.abs(x.features[order] - y.features).max()))
        images += len(order)
    return images, worst


def _seconds(runs: list[dict]) -> str:
    return ", ".join(f"{r['phases']['run']:.1f}" for r in runs)


def bench_inputs(quick: bool, data: Path, work: Path) -> str:
    per_class = ["--per-class", "100"] if quick else []
    shards = write_shards(data, work / "cifar10-wds", {"train": 10, "test": 2})
    runs: dict[str, list[dict]] = {"image folder": [], "webdataset": []}
    for _ in range(2):
        runs["image folder"].append(_extract(work, "folder", "bench-pool384",
                                             f"imagefolder:{data}", *per_class))  # fmt: skip
        runs["webdataset"].append(_extract(work, "wds", "bench-pool384", f"wds:{shards}",
                                           *per_class))  # fmt: skip
    images = runs["image folder"][0]["images"]
    rate = {k: max(images / r["phases"]["run"] for r in v) for k, v in runs.items()}
    compared, worst = _same_features(runs["image folder"][-1]["out"], runs["webdataset"][-1]["out"])

    vit = ["--per-class", "5" if quick else "40", "--splits", "test", "--batch-size", "32"]
    layers: dict[str, list[dict]] = {"last layer alone": [], "--layers all": []}
    for _ in range(2):
        for name, out, extra in (("last layer alone", "vit", ()),
                                 ("--layers all", "vit-all", ("--layers", "all"))):  # fmt: skip
            layers[name].append(
                _extract(work, out, "random-vits16", f"imagefolder:{data}", *vit, *extra)
            )
    vit_images = layers["last layer alone"][0]["images"]
    run = {k: min(r["phases"]["run"] for r in v) for k, v in layers.items()}
    lines = [
        f"**Webdataset against a folder.** {images} CIFAR-10 JPEGs (train and test) through "
        "`bench-pool384` (no model: the input is what is timed), batches of 64, the default "
        "loader; the shards (train 10, test 2, CLIP_benchmark's layout) hold the folder's own "
        "files. Each run a fresh process, folder and shards alternating twice; the better "
        "run clock of each.",
        "",
        "| input | images/s (run clock) | runs (s) |",
        "| --- | --- | --- |",
        *[f"| {k} | {rate[k]:.0f} | {_seconds(v)} |" for k, v in runs.items()],
        "",
        f"Webdataset / folder: **{rate['webdataset'] / rate['image folder']:.2f}x** (goal >= "
        f"0.95x). Features of the {compared} images, matched by id: largest absolute "
        f"difference **{worst:g}**.",
        "",
        f"**Every layer in one pass.** ViT-S/16 (random-vits16), {vit_images} CIFAR-10 test "
        "images at 224, batches of 32, fp32 on this CPU; the last layer's sets alone, then "
        "`--layers all` (12 blocks x CLS and patch mean: 24 more sets). Fresh processes, "
        "alternating twice; the better run clock of each.",
        "",
        "| extraction | run clock (s) | images/s |",
        "| --- | --- | --- |",
        *[f"| {k} | {v:.2f} | {vit_images / v:.1f} |" for k, v in run.items()],
        "",
        "`--layers all` / last layer alone: "
        f"**{run['--layers all'] / run['last layer alone']:.3f}x** the time (goal <= 1.15x).",
    ]  # fmt: skip
    return "\n".join(lines)

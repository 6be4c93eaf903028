"""featcache's own cost, without a model to hide it: the `pipeline` and `resize` sections.

pipeline: extraction with a near-free backbone (``bench-pool384``: the resized image pooled to
384 numbers) over all 60,000 CIFAR-10 JPEGs, beside its loader alone and its preprocessing
alone, each in a fresh process. The GPU exposes exactly this overhead; the goal is an end to
end rate (run clock) of at least 0.9x the slower of the other two.

resize: 1024 CIFAR images to 224 (bicubic) by each way featcache has had of making them,
time (best of 3) and peak memory, and how many pixels equal PIL's.

    python bench/run.py --only pipeline,resize [--quick]
    python bench/pipeline.py extract ARGS...   # `featcache extract` with bench-pool384
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
PY = sys.executable


def register() -> None:
    """The near-free backbone: 224x224 bicubic ImageNet preprocessing, then an average pool
    to 3 x 8 x 16 = 384 numbers (one pass over the input: the cost of reading it)."""
    from featcache.backbones import BackboneSpec, builder, register

    def pool(model, x):
        return {"pooled": torch.nn.functional.adaptive_avg_pool2d(x, (8, 16)).flatten(1)}

    builder("bench-pool")(lambda spec, weights: (torch.nn.Identity(), pool))
    register(
        BackboneSpec(
            name="bench-pool384", family="bench-pool", weights_id="none", input_size=224,
            interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            features=(("pooled", 384),), description="benchmarks only: a pool, no model",
        )
    )  # fmt: skip


def pipeline_child(*args: str) -> dict:
    """Run ``python bench/pipeline.py ARGS`` in a fresh process; its last line is JSON."""
    r = subprocess.run([PY, __file__, *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"bench/pipeline.py {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def loader_alone(data: str, per_class: int | None) -> dict:
    """Every image of both splits through extraction's loader (its default workers, their
    start included), nothing else."""
    from featcache.device import default_workers
    from featcache.extraction import extract as ex

    cfg = ex.ExtractConfig(backbone="bench-pool384", dataset=f"imagefolder:{data}", out="-",
                           train_per_class=per_class, test_per_class=per_class)  # fmt: skip
    splits = ex.prepare_splits(cfg)
    pre = ex.get_spec("bench-pool384").preprocess()
    keys = [(name, i) for name, s in splits.items() for i in range(len(s))]
    batches = [keys[i : i + 64] for i in range(0, len(keys), 64)]
    cpu = torch.device("cpu")
    start, images = time.perf_counter(), 0
    for order, _, _ in ex.image_loader(splits, pre, batches, default_workers(cpu), cpu):
        images += len(order)
    return {"images": images, "seconds": time.perf_counter() - start}


def preprocess_alone(batches: int) -> dict:
    """The preprocessing of uint8 CIFAR batches of 64 already in memory (after one warm-up)."""
    pre = _spec_preprocess()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), np.uint8))
    pre(x, torch.channels_last)
    start = time.perf_counter()
    for _ in range(batches):
        pre(x, torch.channels_last)
    return {"images": 64 * batches, "seconds": time.perf_counter() - start}


def _spec_preprocess():
    from featcache.backbones import get_spec

    return get_spec("bench-pool384").preprocess()


def _extraction(data: Path, work: Path, subset: list[str], *extra: str) -> dict:
    out, result = work / "pool384.h5", work / "pool384.json"
    out.unlink(missing_ok=True)
    pipeline_child("extract", "--backbone", "bench-pool384", "--dataset", f"imagefolder:{data}",
           "--out", str(out), "--no-progress", "--json", str(result), *subset, *extra)  # fmt: skip
    return json.loads(result.read_text())


def bench_pipeline(quick: bool, data: Path, work: Path) -> str:
    per_class = 100 if quick else None
    subset = [] if per_class is None else ["--per-class", str(per_class)]
    runs = {"default (no worker)": _extraction(data, work, subset),
            "--workers 1": _extraction(data, work, subset, "--workers", "1")}  # fmt: skip
    images = runs["default (no worker)"]["images"]
    loader = pipeline_child("loader", str(data), str(per_class or 0))
    pre = pipeline_child("preprocess", str(20 if quick else 100))
    rates = {
        "loader alone (default)": loader["images"] / loader["seconds"],
        "preprocessing alone": pre["images"] / pre["seconds"],
    }
    for name, r in runs.items():
        rates[f"extraction, {name}: run clock"] = images / r["phases"]["run"]
        rates[f"extraction, {name}: process"] = images / r["phases"]["total"]
    slower = min(rates["loader alone (default)"], rates["preprocessing alone"])
    ratios = {name: images / r["phases"]["run"] / slower for name, r in runs.items()}
    lines = [
        f"{images} CIFAR-10 JPEGs (train and test) at 224, bicubic, through `bench-pool384` "
        "(a 384-number average pool: no model), `featcache extract` with batches of 64 and "
        "its default loader workers (none on the CPU: decoding in the process), then with "
        "`--workers 1`; each measurement a fresh process, one after another. Preprocessing alone: "
        f"{pre['images']} images in batches of 64 already in memory (PIL on 2 threads, "
        "normalised into channels_last).",
        "",
        "| measurement | images/s |",
        "| --- | --- |",
        *[f"| {k} | {v:.0f} |" for k, v in rates.items()],
        "",
        "Extraction's run clock / the slower of loader and preprocessing (goal >= 0.9x): "
        + ", ".join(f"{name} **{v:.2f}x**" for name, v in ratios.items()) + ". Phases (s), "
        "default: "
        + ", ".join(f"{k} {v:.2f}" for k, v in runs["default (no worker)"]["phases"].items())
        + ".",
    ]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# resize: every way featcache has made its images


def _old_float64_products(images: torch.Tensor, size) -> torch.Tensor:
    """Commit 30cfa94's CUDA path (torch's uint8 kernel arithmetic, bicubic a = -0.75, as
    float64 matrix products), kept here to be measured against: its float32 output."""
    import math

    def bicubic(x, a=-0.75):
        x = abs(x)
        if x < 1.0:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2.0 else 0.0

    def weights(n_in, n_out):
        scale, w, wt_max = n_in / n_out, np.zeros((n_out, n_in)), 0.0
        for i in range(n_out):
            src = scale * (i + 0.5) - 0.5
            index = min(math.floor(np.float32(src)), n_in - 1)
            lam = min(max(src - index, 0.0), 1.0)
            for j in range(4):
                k = min(max(index - 1 + j, 0), n_in - 1)
                w[i, k] += bicubic(j - 1 - lam)
                wt_max = max(wt_max, w[i, k])
        p = 0
        while p < 22 and int(0.5 + wt_max * (1 << (p + 1))) < (1 << 15):
            p += 1
        s = w * (1 << p)
        return torch.from_numpy(np.trunc(s + np.where(s < 0, -0.5, 0.5)) / (1 << p))

    out = torch.empty(*images.shape[:-2], *size)
    step = max(1, 2**26 // (3 * size[0] * size[1]))
    for i in range(0, len(images), step):
        x = images[i : i + step].to(torch.float64)
        for dim, n_out in ((-1, size[1]), (-2, size[0])):
            w = weights(x.shape[dim], n_out)
            x = x @ w.T if dim == -1 else w @ x
            x.add_(0.5).floor_().clamp_(0, 255)
        out[i : i + step] = x
    return out


def _normalised(u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255
    scale = 1 / (torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255)
    return u8.float().sub_(mean).mul_(scale).contiguous(memory_format=torch.channels_last)


RESIZERS = {
    "float64 products, torch's a = -0.75 (30cfa94's CUDA path)": lambda x: _normalised(
        _old_float64_products(x, (224, 224))
    ),
    "torch's uint8 kernel, a = -0.75 (30cfa94's CPU path)": lambda x: _normalised(
        torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic")
    ),
    "float64 products, PIL's weights (portable path)": lambda x: _path(x, "torch"),
    "PIL on threads (the CPU path)": lambda x: _path(x, "pil"),
}


def _path(x: torch.Tensor, kernel: str) -> torch.Tensor:
    from featcache import preprocessing

    chosen = preprocessing.resize_kernel
    preprocessing.resize_kernel = lambda device: kernel
    try:
        return _spec_preprocess()(x, torch.channels_last)
    finally:
        preprocessing.resize_kernel = chosen


def _cifar_batch(data: str, n: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(Path(data, "test").rglob("*.jpg"))[:: max(1, 10000 // n)][:n]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def resize_one(name: str, data: str) -> dict:
    """One way of resizing, in a fresh process: time (best of 3), peak memory above the
    input's, pixels equal to PIL's."""
    x = _cifar_batch(data, 1024)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        y = None  # one output alive at a time
        start = time.perf_counter()
        y = RESIZERS[name](x)
        times.append(time.perf_counter() - start)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    ref = _normalised(_pil_reference(x))
    return {
        "seconds": min(times),
        "peak_mib": peak,
        "equal_pixels": float((y == ref).float().mean()),
    }


def _pil_reference(x: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    out = [
        np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize((224, 224), 3)) for im in x
    ]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def bench_resize(quick: bool, data: Path) -> str:
    del quick  # 1024 images either way: the acceptance's batch
    rows = [(name, pipeline_child("resize", name, str(data))) for name in RESIZERS]
    lines = [
        "1024 CIFAR-10 test images (uint8, 32x32) to the model's input at 224 (bicubic, "
        "ImageNet normalisation, float32 channels_last), on the CPU, each way in a fresh "
        "process: seconds (best of 3), peak memory above the input's (the 588 MiB output "
        "included), and the share of values equal to PIL's `Image.resize` normalised alike.",
        "",
        "| resize | seconds | images/s | peak MiB | equal to PIL |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['seconds']:.3f} | {1024 / r['seconds']:.0f} | "
                     f"{r['peak_mib']:.0f} | {100 * r['equal_pixels']:.2f}% |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH.parent))
    register()
    command, args = sys.argv[1], sys.argv[2:]
    if command == "extract":
        from featcache.cli import main

        main(["extract", *args], standalone_mode=False)
        print(json.dumps({}))
    elif command == "loader":
        print(json.dumps(loader_alone(args[0], int(args[1]) or None)))
    elif command == "preprocess":
        print(json.dumps(preprocess_alone(int(args[0]))))
    elif command == "resize":
        print(json.dumps(resize_one(args[0], args[1])))

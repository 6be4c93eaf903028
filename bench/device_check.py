"""The device check: featcache's GPU path proven in one run (started by bench/device_check.sh).

1. registry: every entry (random or offline weights) extracts the same CIFAR images on the
   device (the eager model) and on the CPU (fp32, TorchScript-frozen where the entry says so):
   per-image feature cosine, its minimum over images (fp32 >= 0.999, bf16 >= 0.99);
2. pixels: the device's resized images `torch.equal` to PIL's, for every input size and
   filter of the registry (the CPU rehearsal runs CUDA's Triton kernels in their interpreter);
3. throughput: all 60,000 CIFAR-10 images through ViT-S/16 (DINO's code path from a local
   random checkpoint) at 224 in bf16, batch 1024, with `featcache extract --json`, beside the
   bare forward timed like for like (each in a fresh process, after one warm-up, same
   precision, batch, channels_last). Goals: the run clock (first batch submitted to the last
   shard committed) >= 0.9x the bare forward's rate; the process total (interpreter start to
   finished store) <= the bare forward's time + 2 s. The phase table, and the rate of each
   stage alone (loader, preprocessing, forward step: pipeline_parts);
4. torchrun: `torchrun --nproc_per_node 1` (nccl on a GPU) makes the single process's store;
5. evaluation: a Lite0 store extracted on the device and probed there, against a Lite0 store
   extracted and probed on the CPU: probe and k-NN top-1 within 0.2 points (and the device's
   store probed on the CPU, which separates the probe's device from the extraction's);
6. compile: the throughput check with --compile, against the compiled bare forward: >= 0.9x
   and >= 25,000 images/s; compile time on its own line (last: it takes the longest).

Every check runs even if an earlier one failed or broke; the report (device-check.json, and
device-check.md as a table) is rewritten after each check, so a run cut short keeps what it
finished; the exit status is 1 if any check failed.

    python bench/device_check.py --device cuda --data data/cifar10-jpeg --out runs/device-check
    python bench/device_check.py --device cpu --small ...   # the CPU rehearsal (a default test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # noqa: E402  (bench/run.py: the bare forward, as `make bench` measures it)

from featcache.backbones import available_backbones, get_spec  # noqa: E402
from featcache.extraction.extract import ExtractConfig, extract  # noqa: E402
from featcache.io import write_atomic  # noqa: E402
from featcache.store import Store  # noqa: E402

COSINE_FLOOR = {"fp32": 0.999, "bf16": 0.99}
THROUGHPUT_RATIO = 0.9  # the run clock's rate against the bare forward's
PROCESS_OVERHEAD = 2.0  # seconds the whole process may take beyond the bare forward's time
COMPILED_RATE = 25_000  # images/s with --compile
EVAL_TOLERANCE = 0.2  # points of top-1
PROCESS_TIMEOUT = 240  # seconds for any one featcache process, so that a hang cannot eat the run


@dataclass(frozen=True)
class Sizes:
    """Images per check; ``small`` is the CPU rehearsal (under 2 minutes on 2 cores, one
    registry entry per family)."""

    registry_per_class: int  # test images per class through every entry
    throughput_per_class: int | None  # per class and split; None: all 60,000
    torchrun_per_class: int
    eval_train_per_class: int
    eval_test_per_class: int
    batch: int  # throughput and torchrun runs


FULL = Sizes(26, None, 50, 500, 500, batch=1024)
SMALL = Sizes(1, 1, 1, 10, 5, batch=64)


def precisions(device: str) -> tuple[str, ...]:
    """bf16 where it is native (GPUs, recent CPUs); elsewhere emulated, 7x slower than fp32."""
    from featcache.device import cpu_has_native_bf16

    return ("fp32", "bf16") if device != "cpu" or cpu_has_native_bf16() else ("fp32",)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _extract(work: Path, name: str, **kw) -> Store:
    out = work / f"{name}.h5"
    extract(ExtractConfig(out=str(out), progress=False, overwrite=True, **kw))
    return Store(out)


def _featcache(*args: str, launcher: tuple[str, ...] = ()) -> None:
    """`python [launcher] -m featcache ARGS`, refused if it fails or outlives its timeout."""
    cmd = [sys.executable, *launcher, "-m", "featcache", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"[-3000:])


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return float((a * b).sum(1).min())


@contextlib.contextmanager
def _not_pil_on_the_cpu(device: str):
    """On the CPU (the rehearsal), the device's images come from the portable path (float64
    products), so that the reference (PIL itself) is compared with another implementation."""
    from featcache import preprocessing

    chosen = preprocessing.resize_kernel
    if device == "cpu":
        preprocessing.resize_kernel = lambda d: "torch"
    try:
        yield
    finally:
        preprocessing.resize_kernel = chosen


def registry_entries(small: bool) -> list[str]:
    """Every entry; the CPU rehearsal takes one per family (the narrowest), which runs each
    builder and loading path while the ViT-B-sized checkpoints stay for the GPU run."""
    names = [n for n in available_backbones() if n != "test-tiny"]  # registered by tests
    if not small:
        return names
    narrowest: dict[str, str] = {}
    for name in sorted(names, key=lambda n: sum(w for _, w in get_spec(n).features)):
        narrowest.setdefault(get_spec(name).family, name)
    return sorted(narrowest.values())


def check_registry(device: str, data: Path, work: Path, sizes: Sizes, small: bool) -> dict:
    rows = []
    for name in registry_entries(small):
        common = dict(
            backbone=name,
            weights=bench.weights_for(name, work / "weights"),
            dataset=f"imagefolder:{data}",
            splits=("test",),
            test_per_class=sizes.registry_per_class,
        )
        try:
            ref = _extract(work, f"{name}-cpu-fp32", device="cpu", precision="fp32", **common)
        except Exception as exc:  # the entry's row says so; the other entries still run
            traceback.print_exc()
            rows.append({"backbone": name, "precision": "cpu", "pass": False, "error": _error(exc)})
            continue
        for precision in precisions(device):
            try:
                # The eager model, as on a GPU: on the CPU this checks TorchScript freezing,
                # and the images are made by the portable float64 path, not PIL itself.
                with _not_pil_on_the_cpu(device):
                    got = _extract(
                        work, f"{name}-{precision}", device=device, precision=precision,
                        freeze=False, **common,
                    )  # fmt: skip
            except Exception as exc:
                traceback.print_exc()
                rows.append(
                    {"backbone": name, "precision": precision, "pass": False, "error": _error(exc)}
                )
                continue
            for feature in ref.splits["test"]:
                a, b = ref.load("test", feature), got.load("test", feature)
                same_ids = a.ids == b.ids
                cos = _min_cosine(a.features, b.features) if same_ids else float("nan")
                rows.append(
                    {
                        "backbone": name,
                        "precision": precision,
                        "feature": feature,
                        "images": len(a.ids),
                        "min_cosine": round(cos, 6),
                        "floor": COSINE_FLOOR[precision],
                        "pass": bool(same_ids and cos >= COSINE_FLOOR[precision]),
                    }
                )
    return {"rows": rows, "pass": bool(rows) and all(r["pass"] for r in rows)}


def _bare(device: str, weights, sizes: Sizes, precision: str, images: int, compile: bool):
    """(images/s, seconds of the first call) of the bare forward in a fresh process, as the
    extraction runs in one: the same model, precision, batch, channels_last and compile mode,
    timed after the same warm-up (extraction warms up in its device phase, before its run
    clock starts)."""
    args = [device, weights or "", precision, str(images), str(sizes.batch), str(int(compile))]
    cmd = [sys.executable, __file__, "--bare", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"the bare forward failed:\n{proc.stderr[-3000:]}")
    rate, first = map(float, proc.stdout.strip().splitlines()[-1].split())
    return rate, first


def _timed_extract(device, data, work, sizes, precision, weights, compile: bool) -> dict:
    """`featcache extract` of the throughput images (ViT-S/16, DINO's code path) in its own
    process; its result (``--json``): images and the phase table."""
    out, result = work / "throughput.h5", work / "throughput.json"
    per_class = sizes.throughput_per_class
    subset = [] if per_class is None else ["--per-class", str(per_class)]
    _featcache(
        "extract", "--backbone", "dino-vits16", "--weights", weights,
        "--dataset", f"imagefolder:{data}", "--out", str(out), "--device", device,
        "--precision", precision, "--batch-size", str(sizes.batch), "--shard-size", "8192",
        "--no-progress", "--overwrite", "--json", str(result), *subset,
        *(["--compile"] if compile else []),
    )  # fmt: skip
    return json.loads(result.read_text())


def check_throughput(device: str, data: Path, work: Path, sizes: Sizes, small: bool,
                     compile: bool = False) -> dict:  # fmt: skip
    """ViT-S/16 over the throughput images: extraction's run clock and process total against
    the bare forward timed like for like (fresh processes, both after one warm-up)."""
    weights = bench.weights_for("dino-vits16", work / "weights")
    precision = precisions(device)[-1]
    got = _timed_extract(device, data, work, sizes, precision, weights, compile)
    images, phases = got["images"], got["phases"]
    bare_rate, bare_first = _bare(device, weights, sizes, precision, images, compile)
    run_rate = images / phases["run"]
    bare_seconds = images / bare_rate
    parts = sum(v for k, v in phases.items() if k != "total")
    result = {
        "images": images,
        "precision": precision,
        "compile": compile,
        "phases": phases,
        "run_images_per_s": round(run_rate, 1),
        "process_images_per_s": round(images / phases["total"], 1),
        "bare_images_per_s": round(bare_rate, 1),
        "bare_seconds": round(bare_seconds, 3),
        "bare_first_call_seconds": round(bare_first, 2),  # its compilation, with compile
        "run_over_bare": round(run_rate / bare_rate, 3),
        "process_minus_bare_seconds": round(phases["total"] - bare_seconds, 2),
    }
    if not compile:
        result["parts_images_per_s"] = pipeline_parts(device, data, weights, sizes, precision)
    # The arithmetic holds whatever the machine: the phases add up and the clock's rate is
    # the images over the run phase, which lies within the process.
    arithmetic = (
        abs(parts - phases["total"]) <= 0.05 * phases["total"]
        and 0 < phases["run"] <= phases["total"]
        and images == (20 * sizes.throughput_per_class if small else 60_000)
    )
    if small:  # a handful of images times start-up, not the pipeline: goals not applied
        result["goal"] = "not applied (SMALL): the phases add up, the rates follow from them"
        result["pass"] = bool(arithmetic)
        return result
    if compile:
        result["goal"] = (f"run >= {THROUGHPUT_RATIO}x the compiled bare forward and >= "
                          f"{COMPILED_RATE} images/s")  # fmt: skip
        ok = run_rate >= THROUGHPUT_RATIO * bare_rate and run_rate >= COMPILED_RATE
    else:
        result["goal"] = (f"run >= {THROUGHPUT_RATIO}x bare, process <= bare + "
                          f"{PROCESS_OVERHEAD} s")  # fmt: skip
        ok = run_rate >= THROUGHPUT_RATIO * bare_rate and (
            phases["total"] <= bare_seconds + PROCESS_OVERHEAD
        )
    result["pass"] = bool(arithmetic and ok)
    return result


def check_compile(device: str, data: Path, work: Path, sizes: Sizes, small: bool) -> dict:
    """The throughput check with --compile (its own check: compiling takes the longest, so
    it runs last); compile time: the extraction's device phase and the bare first call."""
    if small:
        return {"pass": True, "skipped": "SMALL: compiling on 2 CPU cores takes minutes"}
    return check_throughput(device, data, work, sizes, small, compile=True)


def check_pixels(device: str, data: Path, work: Path, sizes: Sizes, small: bool) -> dict:
    """Resized pixels on the device `torch.equal` to PIL's, for every (input size,
    interpolation) of the registry: CIFAR test images through the device's preprocessing
    against PIL's resize normalised alike on the CPU. The CPU rehearsal forces the path
    CUDA takes (the Triton kernels, through Triton's interpreter, in a child process)."""
    del work
    if device == "cpu":
        # Triton's interpreter takes seconds per image at 224: the rehearsal resizes to 48.
        size = "48" if small else "0"
        cmd = [sys.executable, __file__, "--pixels", str(data), str(1 if small else 64), size]
        env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"the pixel check failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return pixels_equal(device, data, 256)


def pixels_equal(device: str, data: Path, n: int, size: int = 0) -> dict:
    """``n`` CIFAR test images resized on ``device`` to each registry input size (or to
    ``size`` with each registry filter) against PIL's, normalised alike."""
    from PIL import Image

    from featcache.preprocessing import Preprocess, resize_kernel
    from featcache.preprocessing.pil import FILTERS

    files = sorted(Path(data, "test").rglob("*.jpg"))[:: max(1, 10000 // n)][:n]
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    x = x.permute(0, 3, 1, 2).contiguous()
    rows = []
    recipes = sorted({(size or get_spec(e).input_size, get_spec(e).interpolation)
                      for e in registry_entries(small=False)})  # fmt: skip
    for size, interpolation in recipes:
        q = Preprocess(size, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0)
        got = q(x.to(device), torch.channels_last).cpu()
        resample = FILTERS[interpolation][2]
        ref = [Image.fromarray(im.permute(1, 2, 0).numpy()).resize((size, size), resample)
               for im in x]  # fmt: skip
        ref = torch.from_numpy(np.stack([np.asarray(im) for im in ref])).permute(0, 3, 1, 2).float()
        mean = torch.tensor(q.mean).view(1, 3, 1, 1) * 255
        scale = 1 / (torch.tensor(q.std).view(1, 3, 1, 1) * 255)
        equal = torch.equal(got, ref.sub_(mean).mul_(scale))
        rows.append({"size": size, "interpolation": interpolation, "images": len(x),
                     "kernel": resize_kernel(torch.device(device)), "equal": equal})  # fmt: skip
    return {"rows": rows, "pass": all(r["equal"] for r in rows)}


def pipeline_parts(device: str, data: Path, weights, sizes: Sizes, precision: str) -> dict:
    """images/s of each stage of featcache's extraction alone, to tell which one limits it:
    its loader (``image_loader`` with the default workers, their start included; no model),
    its preprocessing on the device (4 uint8 batches already there, after a warm-up pass),
    and its step on decoded batches (copy to the device, preprocessing, model; features left
    on the device, as extraction leaves them until a shard is done)."""
    from featcache.device import default_workers, inference_backends
    from featcache.extraction import extract as ex

    dev = torch.device(device)
    per_class = sizes.throughput_per_class
    cfg = ex.ExtractConfig(
        backbone="dino-vits16", weights=weights, dataset=f"imagefolder:{data}", out="-",
        splits=("train",), train_per_class=per_class if per_class is not None else 2000,
        batch_size=sizes.batch, precision=precision, freeze=False,
    )  # fmt: skip
    model, preprocess = ex.load_backbone("dino-vits16", weights)
    splits = ex.prepare_splits(cfg)
    keys = [("train", i) for i in range(len(splits["train"]))]
    batches = [keys[i : i + sizes.batch] for i in range(0, len(keys), sizes.batch)]
    loader = ex.image_loader(splits, preprocess, batches, default_workers(dev), dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    start, decoded = time.perf_counter(), []
    for _, groups, _ in loader:
        decoded.append([g for _, g in groups])
    images = sum(len(g) for b in decoded for g in b)
    rates = {"loader": images / (time.perf_counter() - start)}
    with inference_backends(dev, precision):
        on_device = [[g.to(dev) for g in b] for b in decoded[:4]]
        for _ in range(2):  # a warm-up pass, then the timed one
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                for b in on_device:
                    for g in b:
                        preprocess(g, torch.channels_last)
            sync()
            seconds = time.perf_counter() - start
        rates["preprocess"] = sum(len(g) for b in on_device for g in b) / seconds
        step = ex._Step(cfg, model, preprocess, dev, precision, splits, [])
        step.forward(decoded[0])  # warm-up
        sync()
        start = time.perf_counter()
        for b in decoded:
            step.forward(b)
        sync()
        rates["forward_step"] = images / (time.perf_counter() - start)
    return {k: round(v, 1) for k, v in rates.items()}


def check_torchrun(device: str, data: Path, work: Path, sizes: Sizes) -> dict:
    args = [
        "extract", "--backbone", "efficientnet-lite0", "--dataset", f"imagefolder:{data}",
        "--per-class", str(sizes.torchrun_per_class), "--device", device, "--precision", "fp32",
        "--batch-size", str(sizes.batch), "--shard-size", "64", "--no-progress", "--overwrite",
    ]  # fmt: skip
    single, launched = work / "single.h5", work / "torchrun.h5"
    _featcache(*args, "--out", str(single))
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1")
    _featcache(*args, "--out", str(launched), launcher=torchrun)
    a, b = Store(single), Store(launched)
    same, close, bitwise, max_diff = a.fingerprint == b.fingerprint, True, True, 0.0
    for split in a.splits:
        x, y = a.load(split, "pooled"), b.load(split, "pooled")
        same &= x.ids == y.ids and np.array_equal(x.labels, y.labels)
        # cuDNN autotuning may pick other algorithms in another process: fp32 rounding apart.
        close &= np.allclose(x.features, y.features, rtol=1e-4, atol=1e-5)
        bitwise &= np.array_equal(x.features, y.features)
        max_diff = max(max_diff, float(np.abs(x.features - y.features).max()))
    return {
        "images": sum(a.sizes.values()),
        "backend": "gloo" if device == "cpu" else "nccl",
        "same_fingerprint_ids_labels": bool(same),
        "bitwise_equal_features": bool(bitwise),
        "max_abs_feature_difference": max_diff,
        "pass": bool(same and close),
    }


def check_evaluation(device: str, data: Path, work: Path, sizes: Sizes) -> dict:
    from featcache.evaluation.knn import KnnConfig
    from featcache.evaluation.methods import run
    from featcache.evaluation.probe import ProbeConfig

    common = dict(
        backbone="efficientnet-lite0",
        dataset=f"imagefolder:{data}",
        train_per_class=sizes.eval_train_per_class,
        test_per_class=sizes.eval_test_per_class,
        precision="fp32",
    )
    ks = tuple(k for k in (20, 200) if k <= 10 * sizes.eval_train_per_class)
    stores = {
        # the CPU's reference path (TorchScript-frozen), and the device's (eager)
        "cpu": _extract(work, "lite0-eval-cpu", device="cpu", **common),
        "device": _extract(work, "lite0-eval-device", device=device, freeze=False, **common),
    }
    runs = {  # role: (store, probe device)
        "cpu": ("cpu", "cpu"),
        "device": ("device", device),
        "device store, cpu probe": ("device", "cpu"),
    }
    results = {}
    for role, (store, probe_device) in runs.items():
        path = str(stores[store].path)
        probe = run(path, "probe", ProbeConfig(device=probe_device))
        knn = run(path, "knn", KnnConfig(k=ks))
        results[role] = {
            "probe_top1": probe["test"]["top1"],
            **{f"knn_top1_k{r['k']}": r["top1"] for r in knn["results"]},
        }
    diffs = {
        role: {k: round(v - results["cpu"][k], 3) for k, v in r.items()}
        for role, r in results.items()
        if role != "cpu"
    }
    return {
        "train_images": 10 * sizes.eval_train_per_class,
        "test_images": 10 * sizes.eval_test_per_class,
        "top1": results,
        "difference_to_cpu": diffs,
        "tolerance": EVAL_TOLERANCE,
        "pass": all(abs(d) <= EVAL_TOLERANCE for r in diffs.values() for d in r.values()),
    }


def environment(device: str) -> dict:
    import timm
    import transformers

    return {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "machine": bench.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _summary(name: str, r: dict) -> str:
    if "error" in r:
        return f"error: {r['error'].splitlines()[0][:200]}"
    if name == "registry":
        worst: dict[tuple, float | str] = {}
        for row in r["rows"]:
            key = (row["backbone"], row["precision"])
            if "error" in row:
                worst[key] = "error"
            elif worst.get(key) != "error":
                worst[key] = min(worst.get(key, 1.0), row["min_cosine"])
        return "min cosine to CPU fp32: " + ", ".join(
            f"{b} {p} {v if isinstance(v, str) else f'{v:.6f}'}" for (b, p), v in worst.items()
        )
    if name in ("throughput", "compile"):
        if "skipped" in r:
            return r["skipped"]
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        return (
            f"{r['images']} images, {r['precision']}{', compiled' if r['compile'] else ''}: "
            f"run {r['run_images_per_s']:.0f}/s, process {r['process_images_per_s']:.0f}/s; "
            f"bare forward {r['bare_images_per_s']:.0f}/s ({r['bare_seconds']:.2f} s, first "
            f"call {r['bare_first_call_seconds']:.1f} s); run/bare {r['run_over_bare']:.2f}, "
            f"process - bare {r['process_minus_bare_seconds']:.2f} s (goal: {r['goal']}); "
            f"phases (s): {phases}"
            + ("; alone: " + ", ".join(f"{k} {v:.0f}/s" for k, v in r["parts_images_per_s"].items())
               if "parts_images_per_s" in r else "")
        )  # fmt: skip
    if name == "pixels":
        return "; ".join(
            f"{row['size']} {row['interpolation']} ({row['kernel']}, {row['images']} images): "
            f"{'equal' if row['equal'] else 'DIFFERENT'}"
            for row in r["rows"]
        )
    if name == "torchrun":
        return (
            f"{r['images']} images, {r['backend']}: same fingerprint, ids and labels "
            f"{r['same_fingerprint_ids_labels']}, bitwise equal features "
            f"{r['bitwise_equal_features']}, max difference {r['max_abs_feature_difference']:.2e}"
        )
    top1 = r["top1"]
    return f"top-1 on {r['test_images']} test images, " + "; ".join(
        f"{role}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()) for role, t in top1.items()
    )


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"Device check ({'SMALL, ' if report['small'] else ''}--device {report['device']}): "
        f"{env['device']}; {env['machine']}; transformers {env['transformers']}, "
        f"timm {env['timm']}; {env['date']}. Overall: {'PASS' if report['pass'] else 'FAIL'} "
        f"({report['seconds']} s).",
        "",
        "| check | result | pass | seconds |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in report["checks"].items():
        passed = "yes" if r["pass"] else "NO"
        lines.append(f"| {name} | {_summary(name, r)} | {passed} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if sys.argv[1:2] == ["--bare"]:  # a child: the bare forward, as _bare reads it
        device, weights, precision, n, batch, compile = sys.argv[2:8]
        if device == "cpu":
            from featcache.device import keep_freed_memory

            keep_freed_memory()
        rate = bench.bare_forward(
            "dino-vits16", int(n), int(batch), precision, torch.device(device),
            bool(int(compile)), weights or None,
        )  # fmt: skip
        print(*rate)
        return 0
    if sys.argv[1:2] == ["--pixels"]:  # a child: CUDA's kernels in Triton's interpreter
        from featcache import preprocessing

        preprocessing.resize_kernel = lambda device: "triton"
        print(
            json.dumps(pixels_equal("cpu", Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
        )
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="A few images per check.")
    ap.add_argument("--data", type=Path, required=True, help="CIFAR-10 as image folders.")
    ap.add_argument("--out", type=Path, required=True, help="Where the report goes.")
    ap.add_argument("--work", type=Path, required=True, help="Stores and checkpoints.")
    ap.add_argument("--skip", default="", help="Checks not to run, comma-separated.")
    args = ap.parse_args()
    sizes = SMALL if args.small else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {
        "device": args.device,
        "small": args.small,
        "environment": environment(args.device),
        "checks": {},
    }
    common = (args.device, args.data, args.work, sizes)
    checks = {
        "registry": (check_registry, *common, args.small),
        "pixels": (check_pixels, *common, args.small),
        "throughput": (check_throughput, *common, args.small),
        "torchrun": (check_torchrun, *common),
        "evaluation": (check_evaluation, *common),
        "compile": (check_compile, *common, args.small),
    }
    checks = {k: v for k, v in checks.items() if k not in args.skip.split(",")}
    for name, (fn, *fn_args) in checks.items():
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            result = fn(*fn_args)
        except Exception as exc:  # a broken check is a result too: the others still run
            traceback.print_exc()
            result = {"pass": False, "error": _error(exc)}
        result["seconds"] = round(time.perf_counter() - t, 1)
        report["checks"][name] = result
        print(json.dumps(result, indent=1), flush=True)
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["pass"] = all(r["pass"] for r in report["checks"].values())
        write_atomic(args.out / "device-check.json", json.dumps(report, indent=1))
        write_atomic(args.out / "device-check.md", markdown(report))
    print(markdown(report))
    return 0 if report["pass"] and len(report["checks"]) == len(checks) else 1


if __name__ == "__main__":
    sys.exit(main())

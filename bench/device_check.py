"""The device check: featcache's GPU path proven in one run (started by bench/device_check.sh).

1. registry: every entry (random or offline weights) extracts the same CIFAR images on the
   device (the eager model) and on the CPU (fp32, TorchScript-frozen where the entry says so):
   per-image feature cosine, its minimum over images (fp32 >= 0.999, bf16 >= 0.99);
2. throughput: all 60,000 CIFAR-10 images through ViT-S/16 (DINO's code path from a local
   random checkpoint) at 224 in bf16 with `featcache extract`, beside the bare forward on ready
   tensors on the same device. Goal: featcache's extraction rate (its own clock: first batch to
   last shard committed) >= 0.8x the bare forward's, in under 5 s; the process's wall time
   (start to finished store: interpreter, imports, model load and assembly too) is reported,
   and the rate of each stage alone (loader, preprocessing, forward step: pipeline_parts);
3. torchrun: `torchrun --nproc_per_node 1` (nccl on a GPU) makes the single process's store;
4. evaluation: a Lite0 store extracted on the device and probed there, against a Lite0 store
   extracted and probed on the CPU: probe and k-NN top-1 within 0.2 points (and the device's
   store probed on the CPU, which separates the probe's device from the extraction's).

Every check runs even if an earlier one failed or broke; the report (device-check.json, and
device-check.md as a table) is rewritten after each check, so a run cut short keeps what it
finished; the exit status is 1 if any check failed.

    python bench/device_check.py --device cuda --data data/cifar10-jpeg --out runs/device-check
    python bench/device_check.py --device cpu --small ...   # the CPU rehearsal (a default test)
"""

from __future__ import annotations

import argparse
import functools
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
from featcache.store import Store, write_atomic  # noqa: E402

COSINE_FLOOR = {"fp32": 0.999, "bf16": 0.99}
THROUGHPUT_RATIO, THROUGHPUT_SECONDS = 0.8, 5.0
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
                # The eager model, as on a GPU: on the CPU this checks TorchScript freezing.
                got = _extract(
                    work,
                    f"{name}-{precision}",
                    device=device,
                    precision=precision,
                    freeze=False,
                    **common,
                )
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


def check_throughput(device: str, data: Path, work: Path, sizes: Sizes, small: bool) -> dict:
    weights = bench.weights_for("dino-vits16", work / "weights")
    precision = precisions(device)[-1]
    out = work / "throughput.h5"
    per_class = sizes.throughput_per_class
    subset = [] if per_class is None else ["--per-class", str(per_class)]
    start = time.perf_counter()
    _featcache(
        "extract", "--backbone", "dino-vits16", "--weights", weights,
        "--dataset", f"imagefolder:{data}", "--out", str(out), "--device", device,
        "--precision", precision, "--batch-size", str(sizes.batch), "--shard-size", "8192",
        "--no-progress", "--overwrite", *subset,
    )  # fmt: skip
    wall = time.perf_counter() - start
    # featcache's own clock, from the store: the seconds its shards took, summed.
    store = Store(out)
    images, seconds = sum(store.sizes.values()), store.extraction["seconds"]
    rate = images / seconds
    bare, _ = bench.bare_forward(
        "dino-vits16", images, sizes.batch, precision, torch.device(device), weights=weights
    )
    parts = pipeline_parts(device, data, weights, sizes, precision)
    result = {
        "images": images,
        "precision": precision,
        "extraction_seconds": round(seconds, 3),
        "extraction_images_per_s": round(rate, 1),
        "process_seconds": round(wall, 2),
        "process_images_per_s": round(images / wall, 1),
        "bare_images_per_s": round(bare, 1),
        "ratio": round(rate / bare, 3),
        "parts_images_per_s": parts,
    }
    if small:  # a handful of images times start-up, not the pipeline: goals not applied
        result["goal"] = "not applied (SMALL)"
        result["pass"] = images == 20 * per_class
    else:
        result["goal"] = f"extraction >= {THROUGHPUT_RATIO}x bare, < {THROUGHPUT_SECONDS} s"
        result["pass"] = bool(
            images == 60_000 and rate >= THROUGHPUT_RATIO * bare and seconds < THROUGHPUT_SECONDS
        )
    return result


def pipeline_parts(device: str, data: Path, weights, sizes: Sizes, precision: str) -> dict:
    """images/s of each stage of featcache's extraction alone, to tell which one limits it:
    its loader (``image_loader`` with the default workers, their start included; no model), its
    preprocessing on the device (4 uint8 batches already there, after a warm-up pass), and its
    forward step on decoded batches (copy to the device, preprocessing, model, features
    back)."""
    from featcache.backbones import load_backbone
    from featcache.device import default_workers, inference_backends
    from featcache.extraction import extract as ex

    dev = torch.device(device)
    per_class = sizes.throughput_per_class
    cfg = ex.ExtractConfig(
        backbone="dino-vits16", dataset=f"imagefolder:{data}", out="-", splits=("train",),
        train_per_class=per_class if per_class is not None else 2000,  # 20,000 of CIFAR-10
    )  # fmt: skip
    model, preprocess = load_backbone("dino-vits16", weights)
    split = ex.prepare_splits(cfg)["train"]
    order = list(range(len(split)))
    batches = [order[i : i + sizes.batch] for i in range(0, len(order), sizes.batch)]
    loader = ex.image_loader(split, preprocess, batches, default_workers(dev), dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    start, batches = time.perf_counter(), []
    for _, groups, _ in loader:
        batches.append([g for _, g in groups])
    images = sum(len(g) for b in batches for g in b)
    rates = {"loader": images / (time.perf_counter() - start)}

    model = ex.for_inference(model, dev, torch.channels_last, compile=False, freeze=True)
    forward = functools.partial(
        ex._forward, model, preprocess, device=dev, precision=precision,
        memory_format=torch.channels_last, pad_to=None,
    )  # fmt: skip
    with inference_backends(dev, precision):
        on_device = [[g.to(dev) for g in b] for b in batches[:4]]
        for _ in range(2):  # a warm-up pass, then the timed one
            sync()
            start = time.perf_counter()
            with torch.inference_mode():
                for b in on_device:
                    for g in b:
                        preprocess(g)
            sync()
            seconds = time.perf_counter() - start
        rates["preprocess"] = sum(len(g) for b in on_device for g in b) / seconds
        forward(batches[0])  # warm-up
        start = time.perf_counter()
        for b in batches:
            forward(b)
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
    from featcache.evaluation.knn import KnnConfig, run_knn
    from featcache.evaluation.probe import ProbeConfig, run_probe

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
        probe = run_probe(path, ProbeConfig(device=probe_device))
        knn = run_knn(path, KnnConfig(ks=ks))
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
    if name == "throughput":
        return (
            f"{r['images']} images, {r['precision']}: extraction {r['extraction_seconds']:.2f} s "
            f"({r['extraction_images_per_s']:.0f}/s), process {r['process_seconds']:.1f} s "
            f"({r['process_images_per_s']:.0f}/s); bare forward {r['bare_images_per_s']:.0f}/s; "
            f"extraction/bare {r['ratio']:.2f} (goal: {r['goal']}); alone: "
            + ", ".join(f"{k} {v:.0f}/s" for k, v in r["parts_images_per_s"].items())
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="A few images per check.")
    ap.add_argument("--data", type=Path, required=True, help="CIFAR-10 as image folders.")
    ap.add_argument("--out", type=Path, required=True, help="Where the report goes.")
    ap.add_argument("--work", type=Path, required=True, help="Stores and checkpoints.")
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
    checks = {
        "registry": (check_registry, args.device, args.data, args.work, sizes, args.small),
        "throughput": (check_throughput, args.device, args.data, args.work, sizes, args.small),
        "torchrun": (check_torchrun, args.device, args.data, args.work, sizes),
        "evaluation": (check_evaluation, args.device, args.data, args.work, sizes),
    }
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

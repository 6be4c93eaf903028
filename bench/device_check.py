"""The device check: featcache's GPU path proven in one run (started by bench/device_check.sh).

1. registry: every entry (random or offline weights) extracts the same CIFAR images on the
   device and on the CPU: per-image feature cosine, its minimum over images, against the CPU's
   fp32 features (fp32 >= 0.999, bf16 >= 0.99);
2. throughput: all 60,000 CIFAR-10 images through ViT-S/16 (DINO's code path from a local
   random checkpoint) at 224 in bf16, `featcache extract` from process start to finished store,
   beside the bare forward on ready tensors on the same device (goal: >= 0.8x, under 5 s of
   extraction);
3. torchrun: `torchrun --nproc_per_node 1` (nccl on a GPU) makes the single process's store;
4. evaluation: probe and k-NN of a Lite0 store extracted (and probed) on the device equal those
   of the CPU's store within 0.2 points.

Every check runs even if an earlier one failed; device-check.json and device-check.md (the same
as a table) go to --out, and the exit status is 1 if any check failed.

    python bench/device_check.py --device cuda --data data/cifar10-jpeg --out runs/device-check
    python bench/device_check.py --device cpu --small ...   # the CPU rehearsal (a default test)
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
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

from featcache.backbones import available_backbones, save_random_weights  # noqa: E402
from featcache.extract import ExtractConfig, extract  # noqa: E402
from featcache.store import Store  # noqa: E402

COSINE_FLOOR = {"fp32": 0.999, "bf16": 0.99}
THROUGHPUT_RATIO, THROUGHPUT_SECONDS = 0.8, 5.0
EVAL_TOLERANCE = 0.2  # points of top-1


@dataclass(frozen=True)
class Sizes:
    """Images per check; ``small`` is the CPU rehearsal (under 2 minutes on 2 cores)."""

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


class Check:
    """Runs checks, keeping each one's figures, its pass/fail and any error."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def __call__(self, name: str, fn, *args) -> None:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = fn(*args)
        except Exception as exc:  # a broken check is a result too: the others still run
            traceback.print_exc()
            result = {"pass": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        self.results[name] = result
        print(json.dumps(result, indent=1), flush=True)


@functools.cache
def _weights(name: str, work: Path) -> str | None:
    """--weights for an entry: one random checkpoint of its real architecture per run."""
    path = save_random_weights(name, work / "weights")
    return str(path) if path else None


def _extract(work: Path, name: str, **kw) -> Store:
    out = work / f"{name}.h5"
    extract(ExtractConfig(out=str(out), progress=False, overwrite=True, **kw))
    return Store(out)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return float((a * b).sum(1).min())


def check_registry(device: str, data: Path, work: Path, sizes: Sizes) -> dict:
    rows = []
    for name in available_backbones():
        common = dict(
            backbone=name,
            weights=_weights(name, work),
            dataset=f"imagefolder:{data}",
            splits=("test",),
            test_per_class=sizes.registry_per_class,
        )
        ref = _extract(work, f"{name}-cpu-fp32", device="cpu", precision="fp32", **common)
        for precision in precisions(device):
            floor = COSINE_FLOOR[precision]
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
                rows.append(
                    {
                        "backbone": name,
                        "precision": precision,
                        "pass": False,
                        "error": f"{type(exc).__name__}: {exc}"[:500],
                    }
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
                        "floor": floor,
                        "pass": bool(same_ids and cos >= floor),
                    }
                )
    return {"rows": rows, "pass": all(r["pass"] for r in rows)}


def check_throughput(device: str, data: Path, work: Path, sizes: Sizes, small: bool) -> dict:
    weights = _weights("dino-vits16", work)
    precision = precisions(device)[-1]
    out = work / "throughput.h5"
    per_class = sizes.throughput_per_class
    subset = [] if per_class is None else ["--per-class", str(per_class)]
    cmd = [
        sys.executable, "-m", "featcache", "extract", "--backbone", "dino-vits16",
        "--weights", weights, "--dataset", f"imagefolder:{data}", "--out", str(out),
        "--device", device, "--precision", precision, "--batch-size", str(sizes.batch),
        "--shard-size", "8192", "--no-progress", "--overwrite", *subset,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"featcache extract failed:\n{proc.stdout}\n{proc.stderr}"[-3000:])
    m = re.search(r"extracted (\d+) images in ([\d.]+) s", proc.stdout)
    images, seconds = int(m.group(1)), float(m.group(2))
    rate = images / seconds
    bare, _ = bench.bare_forward(
        "dino-vits16", images, sizes.batch, precision, torch.device(device), weights=weights
    )
    stored = sum(Store(out).sizes.values())
    result = {
        "images": images,
        "precision": precision,
        "stored": stored,
        "process_seconds": round(wall, 2),
        "extraction_seconds": seconds,
        "featcache_images_per_s": round(rate, 1),
        "process_images_per_s": round(images / wall, 1),
        "bare_images_per_s": round(bare, 1),
        "ratio": round(rate / bare, 3),
    }
    if small:  # a handful of images times start-up, not the pipeline: goals not applied
        result["goal"] = "not applied (SMALL)"
        result["pass"] = stored == images
    else:
        result["goal"] = f">= {THROUGHPUT_RATIO}x bare and < {THROUGHPUT_SECONDS} s"
        result["pass"] = bool(
            stored == images and rate >= THROUGHPUT_RATIO * bare and seconds < THROUGHPUT_SECONDS
        )
    return result


def check_torchrun(device: str, data: Path, work: Path, sizes: Sizes) -> dict:
    args = [
        "extract", "--backbone", "efficientnet-lite0", "--dataset", f"imagefolder:{data}",
        "--per-class", str(sizes.torchrun_per_class), "--device", device, "--precision", "fp32",
        "--batch-size", str(sizes.batch), "--shard-size", "64", "--no-progress", "--overwrite",
    ]  # fmt: skip
    single, launched = work / "single.h5", work / "torchrun.h5"
    runs = {
        single: [sys.executable, "-m", "featcache", *args, "--out", str(single)],
        launched: [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "1", "-m", "featcache", *args, "--out", str(launched),
        ],
    }  # fmt: skip
    for cmd in runs.values():
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n{proc.stdout}\n{proc.stderr}"[-3000:])
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
        "backend": "nccl" if device.startswith("cuda") else "gloo",
        "same_fingerprint_ids_labels": bool(same),
        "bitwise_equal_features": bool(bitwise),
        "max_abs_feature_difference": max_diff,
        "pass": bool(same and close),
    }


def check_evaluation(device: str, data: Path, work: Path, sizes: Sizes) -> dict:
    from featcache.knn import KnnConfig, run_knn
    from featcache.probe import ProbeConfig, run_probe

    common = dict(
        backbone="efficientnet-lite0",
        dataset=f"imagefolder:{data}",
        train_per_class=sizes.eval_train_per_class,
        test_per_class=sizes.eval_test_per_class,
        precision="fp32",
    )
    results = {}
    for where in ("cpu", device):
        store = _extract(work, f"lite0-eval-{where}", device=where, **common)
        probe = run_probe(ProbeConfig(store=str(store.path), device=where))
        ks = tuple(k for k in (20, 200) if k <= 10 * sizes.eval_train_per_class)
        knn = run_knn(KnnConfig(store=str(store.path), ks=ks))
        results[where] = {
            "probe_top1": probe["test"]["top1"],
            **{f"knn_top1_k{r['k']}": r["top1"] for r in knn["results"]},
        }
    cpu, dev = results["cpu"], results[device]
    diffs = {k: round(dev[k] - cpu[k], 3) for k in cpu}
    return {
        "train_images": 10 * sizes.eval_train_per_class,
        "test_images": 10 * sizes.eval_test_per_class,
        "cpu": cpu,
        "device": dev,
        "difference": diffs,
        "tolerance": EVAL_TOLERANCE,
        "pass": all(abs(d) <= EVAL_TOLERANCE for d in diffs.values()),
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


def markdown(report: dict) -> str:
    env, checks = report["environment"], report["checks"]
    lines = [
        f"Device check ({'SMALL, ' if report['small'] else ''}--device {report['device']}): "
        f"{env['device']}; {env['machine']}; transformers {env['transformers']}, "
        f"timm {env['timm']}; {env['date']}. Overall: {'PASS' if report['pass'] else 'FAIL'}.",
        "",
        "| check | result | pass | seconds |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in checks.items():
        if "error" in r:
            summary = f"error: {r['error'].splitlines()[0][:200]}"
        elif name == "registry":
            worst = {}
            for row in r["rows"]:
                key = (row["backbone"], row["precision"])
                if "error" in row:
                    worst[key] = "error"
                elif worst.get(key) != "error":
                    worst[key] = min(worst.get(key, 1.0), row["min_cosine"])
            summary = "min cosine to CPU fp32: " + ", ".join(
                f"{b} {p} {v if isinstance(v, str) else f'{v:.6f}'}" for (b, p), v in worst.items()
            )
        elif name == "throughput":
            summary = (
                f"{r['images']} images: extraction {r['extraction_seconds']:.2f} s "
                f"({r['featcache_images_per_s']:.0f}/s), process {r['process_seconds']:.1f} s; "
                f"bare forward {r['bare_images_per_s']:.0f}/s; ratio {r['ratio']:.2f} "
                f"(goal {r['goal']})"
            )
        elif name == "torchrun":
            summary = (
                f"{r['images']} images, {r['backend']}: same fingerprint, ids and labels "
                f"{r['same_fingerprint_ids_labels']}, bitwise equal features "
                f"{r['bitwise_equal_features']}, max difference "
                f"{r['max_abs_feature_difference']:.2e}"
            )
        else:
            summary = (
                ", ".join(f"{k} {r['cpu'][k]:.2f} vs {r['device'][k]:.2f}" for k in r["cpu"])
                + f" (CPU vs device, {r['test_images']} test images)"
            )
        lines.append(f"| {name} | {summary} | {'yes' if r['pass'] else 'NO'} | {r['seconds']} |")
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
    check = Check()
    check("registry", check_registry, args.device, args.data, args.work, sizes)
    check("throughput", check_throughput, args.device, args.data, args.work, sizes, args.small)
    check("torchrun", check_torchrun, args.device, args.data, args.work, sizes)
    check("evaluation", check_evaluation, args.device, args.data, args.work, sizes)
    report = {
        "device": args.device,
        "small": args.small,
        "environment": environment(args.device),
        "checks": check.results,
        "seconds": round(time.perf_counter() - start, 1),
        "pass": all(r["pass"] for r in check.results.values()),
    }
    (args.out / "device-check.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (args.out / "device-check.md").write_text(table)
    print(table, f"total {report['seconds']} s", sep="\n")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

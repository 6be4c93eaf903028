"""`make bench`: featcache against the bare model and against the usual alternatives, side by side.

Everything in one run on one machine, so ratios are meaningful on a shared, noisy box:

- pipeline and resize: featcache's own cost with a near-free backbone, beside its loader and
  its preprocessing alone; and every way it has had of resizing (bench/pipeline.py);
- inputs: webdataset shards against the same images as a folder, and `--layers all` against
  the last layer alone (bench/inputs.py);
- extraction images/s on CIFAR images at 224: (a) featcache end to end (dataset to finished
  store), (b) the bare forward on ready-made tensors at the same precision and memory layout,
  (c) the naive pipeline (per-image PIL resize, transformers' image processor, fp32 forward);
- precision: probe and k-NN top-1 from a bf16 store against the fp32 store of the same images;
- compile: torch.compile (extract --compile) against the eager forward;
- probe: featcache's weight-decay sweep against scikit-learn's LogisticRegression (lbfgs) over
  the same grid and validation split, on one real cached feature matrix;
- logreg: DINOv2's whole logistic-regression protocol on the 50,000-row store, against
  scikit-learn's refit at the chosen C run to convergence;
- k-NN: featcache (faiss) against torch matmul + topk and scikit-learn's KNeighborsClassifier;
- scaling: extraction wall time and peak memory at 1x, 4x and 16x the images.

Results go to stdout and to BENCHMARKS.md (with the command and the machine).

    python bench/run.py [--only pipeline,resize,inputs,extract,precision,compile,probe,logreg,
                                knn,scaling,large,similarity,smallprobe,zeroshot] [--quick]
                         [--json FILE]  # the large section as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "cifar10-jpeg"
DATA = REPO / "data" / "cifar10-jpeg"
WORK = REPO / "data" / "bench"
PY = sys.executable


def cifar() -> Path:
    for split in ("train", "test"):
        if not (DATA / split / "truck").is_dir():
            DATA.mkdir(parents=True, exist_ok=True)
            with tarfile.open(SHARED / f"{split}.tar.gz") as tar:
                tar.extractall(DATA, filter="data")
    return DATA


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def commit() -> str:
    """The checked-out commit, with ``+changes`` when the working tree differs from it."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return head + (
        "+changes" if git("status", "--porcelain", "--untracked-files=no").strip() else ""
    )


STALE = "> **Stale:** "


def staleness(section: str) -> str:
    """A section kept from an earlier run, marked stale when the code it measured changed
    since (featcache/ or bench/ differ from the commit it names), or when it names none."""
    import re

    title, _, body = section.partition("\n")
    body = "\n".join(line for line in body.split("\n") if not line.startswith(STALE))
    body = body.lstrip("\n")  # the blank line the mark stood in (one more every run)
    stamp = re.search(r"at commit ([0-9a-f]{7,40})", body)
    if stamp is None:
        note = "measured before sections named their commit; rerun it to trust its figures"
    else:
        since = ["git", "diff", "--quiet", stamp.group(1), "--", "featcache", "bench"]
        diff = subprocess.run(since, cwd=REPO, capture_output=True)
        if diff.returncode == 0:
            return f"{title}\n\n{body}"
        note = f"featcache/ or bench/ changed since {stamp.group(1)}; rerun it to trust its figures"
    name = title.strip()
    how = (
        f"`python bench/run.py --only {name}`" if name in SECTIONS
        else "`bench/device_check.sh` on a GPU" if name.startswith("device check")
        else "the commands it lists"
    )  # fmt: skip
    return f"{title}\n\n{STALE}{note} ({how})\n\n{body}"


def batch_size(device) -> int:
    """The batch of every extraction measurement: 64 on the CPU, 512 on a GPU."""
    return 512 if torch.device(device).type == "cuda" else 64


def _timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


# ---------------------------------------------------------------------------------------------
# Extraction


def weights_for(backbone: str, root: Path = WORK / "random-weights") -> str | None:
    """--weights for an entry: hub and SimCLR entries run from a random-weight checkpoint of
    the real architecture, saved once under ``root`` and reused by every measurement."""
    from featcache.backbones import save_random_weights

    saved = root / backbone / "weights-path"
    if not saved.exists():
        path = save_random_weights(backbone, root / backbone)  # makes the folder
        saved.write_text(str(path) if path else "")
    return saved.read_text() or None


def bare_forward(
    backbone: str,
    n: int,
    batch: int,
    precision: str,
    device,
    compile: bool = False,
    weights: str | None = None,
) -> tuple[float, float]:
    """(images/s, seconds of the first call) of the model alone on ready-made normalised
    tensors on the device, the best it can do: channels_last, TorchScript-frozen where
    featcache freezes it (CNNs on the CPU), or through torch.compile with ``compile``;
    ``weights``: as --weights (default: weights_for)."""
    from featcache.backbones import load_backbone
    from featcache.device import autocast, inference_backends
    from featcache.extraction.extract import for_inference

    model, pre = load_backbone(backbone, weights or weights_for(backbone))
    model = for_inference(model, device, torch.channels_last, compile=compile, freeze=True)
    x = torch.randn(batch, 3, pre.input_size, pre.input_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    # The backend settings featcache extracts with (cuDNN autotuning on a GPU).
    with inference_backends(device, precision), torch.inference_mode(), autocast(device, precision):
        t = time.perf_counter()
        model(x)  # warm-up (and compilation)
        sync()
        first = time.perf_counter() - t
        model(x)
        sync()
        t = time.perf_counter()
        for _ in range(max(1, n // batch)):
            model(x)
        sync()
    return max(1, n // batch) * batch / (time.perf_counter() - t), first


def featcache_end_to_end(
    backbone: str, per_class: int, batch: int, precision: str, device, compile: bool = False
):
    """images/s from dataset to finished store (model load and store assembly included;
    compilation too with ``compile``).

    The model's libraries are imported (and its weights read once) before the clock starts:
    a per-process constant, not part of the pipeline.
    """
    from featcache.backbones import load_backbone
    from featcache.extraction.extract import ExtractConfig, extract

    load_backbone(backbone, weights_for(backbone))

    out = WORK / f"e2e-{backbone}-{precision}.h5"
    out.unlink(missing_ok=True)
    cfg = ExtractConfig(
        backbone=backbone,
        weights=weights_for(backbone),
        dataset=f"imagefolder:{cifar()}",
        out=str(out),
        splits=("train",),
        train_per_class=per_class,
        batch_size=batch,
        precision=precision,
        device=str(device),
        progress=False,
        compile=compile,
    )
    seconds, res = _timed(lambda: extract(cfg))
    return res.images / seconds


def naive(backbone: str, n: int, batch: int, device) -> float:
    """The usual script: PIL resize per image, transformers' processor, fp32, list batches;
    timed after one warm-up batch, as the bare forward is."""
    from PIL import Image
    from transformers import ViTImageProcessor

    from featcache.backbones import load_backbone

    model, pre = load_backbone(backbone, weights_for(backbone))
    model = model.to(device)
    processor = ViTImageProcessor(
        size={"height": pre.input_size, "width": pre.input_size},
        image_mean=list(pre.mean),
        image_std=list(pre.std),
    )
    files = sorted(cifar().glob("train/*/*.jpg"))[: n + batch]

    def run(chunk):
        with torch.no_grad():
            for i in range(0, len(chunk), batch):
                images = [
                    Image.open(f).convert("RGB").resize((pre.input_size,) * 2, Image.BILINEAR)
                    for f in chunk[i : i + batch]
                ]
                inputs = processor(images=images, return_tensors="pt")
                model(inputs["pixel_values"].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(files[:batch])  # warm-up
    t = time.perf_counter()
    run(files[batch:])
    return (len(files) - batch) / (time.perf_counter() - t)


def _child(*args: str) -> list[float]:
    """One measurement in a fresh process, so that no allocator or cache state carries over
    (torch.compile's on-disk cache included: compilation is timed cold)."""
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run(
            [PY, __file__, "--child", *args],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
        ).stdout
    return [float(v) for v in out.strip().splitlines()[-1].split()]


def child(kind: str, backbone: str, precision: str, n: str, tuned: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tuned == "tuned" and device.type == "cpu":
        from featcache.device import keep_freed_memory

        keep_freed_memory()
    if kind in ("bare", "compiled"):
        batch = batch_size(device)
        print(*bare_forward(backbone, int(n), batch, precision, device, kind == "compiled"))
    elif kind in ("e2e", "e2e-compiled"):
        compiled = kind == "e2e-compiled"
        batch = batch_size(device)
        print(featcache_end_to_end(backbone, int(n) // 10, batch, precision, device, compiled))
    else:
        print(naive(backbone, int(n), 32, device))


# (images end to end, images for the bare forward and the naive pipeline). On a GPU a few
# thousand images would time the start-up, not the pipeline: the whole training split.
EXTRACT_SIZES = {
    "cpu": {"efficientnet-lite0": (4000, 1024), "dino-vits16": (2000, 512)},
    "cuda": {"efficientnet-lite0": (50000, 16384), "dino-vits16": (50000, 16384)},
}


# The naive pipeline decodes and resizes in one process: on a GPU, timing it over the bare
# forward's 16,384 images would take minutes of device time to learn nothing more.
NAIVE_MAX = 2048


def precisions(device: str) -> tuple[str, ...]:
    """bf16 where it is native (GPUs, CPUs with AVX512-BF16 or AMX): emulated elsewhere, it
    is 7x slower than fp32 (ViT-S/16 on a 2-core AMD EPYC: 1.7 against 11.7 images/s)."""
    from featcache.device import cpu_has_native_bf16

    return ("bf16", "fp32") if device == "cuda" or cpu_has_native_bf16() else ("fp32",)


def bench_extract(quick: bool) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Shared CPUs are noisy (best of 2); a GPU run is short of time instead (gpu.sh: 5 min).
    repeats = 1 if quick or device == "cuda" else 2
    rows, runs = [], []
    # ViT-S/16: DINO's code path (transformers ViTModel) from a local checkpoint, as with
    # --weights; random weights, as the hub is out of reach here.
    sizes = EXTRACT_SIZES[device]
    for backbone, (n, n_bare) in sizes.items():
        if quick:
            n, n_bare = n // 8, n_bare // 4
        r = {}
        for precision in precisions(device):
            # (a) and (b) alternate, best of each: other tenants only ever slow a run down.
            e2e, bare = [], []
            for _ in range(repeats):
                e2e.append(_child("e2e", backbone, precision, str(n), "default")[0])
                bare.append(_child("bare", backbone, precision, str(n_bare), "tuned")[0])
            r[f"e2e-{precision}"], r[f"bare-{precision}"] = max(e2e), max(bare)
            r[f"bare-{precision}-default"] = _child(
                "bare", backbone, precision, str(n_bare), "default"
            )[0]
            runs.append(
                f"{backbone} {precision}: (a) {', '.join(f'{v:.1f}' for v in e2e)}; "
                f"(b) {', '.join(f'{v:.1f}' for v in bare)}"
            )
            print(runs[-1], flush=True)
        n_naive = str(min(n_bare, NAIVE_MAX))
        naive_runs = [
            _child("naive", backbone, "fp32", n_naive, "default")[0] for _ in range(repeats)
        ]
        r["naive"] = max(naive_runs)
        runs.append(f"{backbone} naive fp32: (c) {', '.join(f'{v:.1f}' for v in naive_runs)}")
        rows.append((backbone, r))
        print(backbone, json.dumps({k: round(v, 1) for k, v in r.items()}), flush=True)
    lines = [
        f"Device: {device}; each figure from a fresh process. (a) featcache end to end: wall "
        "of `extract()` (dataset listing, model load, TorchScript freezing for CNNs, "
        f"extraction, store assembly) over {sizes['efficientnet-lite0'][0]} (lite0) or "
        f"{sizes['dino-vits16'][0]} (ViT) CIFAR training JPEGs upscaled to 224, channels_last, "
        f"batches of {batch_size(device)}, the CLI's default loader workers. (b) bare forward, "
        "the best the model can do: ready-made tensors at the same precision and layout, "
        "TorchScript-frozen where featcache freezes (CNNs on the CPU), with the allocator "
        "setting featcache uses (mallopt); in brackets with glibc's default, as a plain script "
        "runs. (c) naive: per-image PIL resize to 224, transformers' ViTImageProcessor, fp32 "
        "eager forward, lists of 32 images. (b) over "
        f"{sizes['efficientnet-lite0'][1]} (lite0) or {sizes['dino-vits16'][1]} (ViT) images "
        f"after two warm-up batches, (c) over as many (at most {NAIVE_MAX}) after one. "
        f"(a) and (b) ran alternately {repeats} times each, (c) "
        f"{repeats} times; the table has the best of each (every run is listed below it)."
        + ("" if "bf16" in precisions(device) else " bf16 is left out: this CPU emulates it."),
        "",
        "| backbone | precision | (a) featcache | (b) bare | a/b | (c) naive fp32 | a/c |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        for p in precisions(device):
            a, b = r[f"e2e-{p}"], r[f"bare-{p}"]
            lines.append(
                f"| {name} | {p} | {a:.1f} | {b:.1f} ({r[f'bare-{p}-default']:.1f}) | "
                f"{a / b:.2f} | {r['naive']:.1f} | {a / r['naive']:.2f} |"
            )
    lines += ["", "Every run, images/s in order:", ""] + [f"- {line}" for line in runs]
    return "\n".join(lines)


def bench_compile(quick: bool) -> str:
    """torch.compile (the --compile flag) against featcache's default forward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = precisions(device)[0]
    sizes = EXTRACT_SIZES[device]
    n = sizes["efficientnet-lite0"][1] // (4 if quick else 1)
    lines = [
        f"{precision}, channels_last, batches of {batch_size(device)}, each figure from a fresh "
        f"process. Bare forward: {n} images after two warm-up batches, without torch.compile as "
        "featcache runs by default (TorchScript-frozen for CNNs on the CPU) and with it; first "
        "call: the first batch, compilation included. End to end: `extract(compile=True)` over "
        "the extract section's images, compilation included.",
        "",
        "| backbone | bare default images/s | bare compiled images/s | compiled / default | "
        "first call default (s) | first call compiled (s) | featcache --compile end to end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backbone, (e2e_n, _) in sizes.items():
        e2e_n = e2e_n // 8 if quick else e2e_n
        eager = _child("bare", backbone, precision, str(n), "tuned")
        compiled = _child("compiled", backbone, precision, str(n), "tuned")
        e2e = _child("e2e-compiled", backbone, precision, str(e2e_n), "default")[0]
        print(backbone, "eager", eager, "compiled", compiled, "e2e", e2e, flush=True)
        lines.append(
            f"| {backbone} | {eager[0]:.1f} | {compiled[0]:.1f} | {compiled[0] / eager[0]:.2f} "
            f"| {eager[1]:.1f} | {compiled[1]:.1f} | {e2e:.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# A real 50,000 x 384 feature matrix: CIFAR-10 through a random-init CIFAR ResNet of width 48


def big_store() -> Path:
    store = WORK / "cifar-full-r18w48.h5"
    if store.exists():
        return store
    run = WORK / "r18w48-init"
    if not (run / "encoder.safetensors").exists():
        from featcache.backbones.simclr_encoder import ResNetCifar, export_encoder

        run.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        export_encoder(run, ResNetCifar(48), 32, {"random": True})
    subprocess.run(_encoder_extract(run, store), check=True)
    return store


def _encoder_extract(run: Path, out: Path, *extra: str) -> list[str]:
    """The CLI command extracting CIFAR through the random-init width-48 encoder in bf16."""
    return [
        PY,
        "-m",
        "featcache",
        "extract",
        "--backbone",
        "simclr-resnet18",
        "--weights",
        str(run),
        "--dataset",
        f"imagefolder:{cifar()}",
        "--out",
        str(out),
        "--batch-size",
        "256",
        "--no-progress",
        "--precision",
        "bf16",
        *extra,
    ]


def bench_probe(quick: bool) -> str:
    from featcache.evaluation.baselines import sklearn_probe
    from featcache.evaluation.data import Splits
    from featcache.evaluation.probe import DEFAULT_WEIGHT_DECAYS, ProbeConfig, probe
    from featcache.store import Store

    store = Store(big_store())
    tr, te = store.load("train", "pooled"), store.load("test", "pooled")
    if quick:
        tr.features, tr.labels = tr.features[:10000], tr.labels[:10000]
    cfg = ProbeConfig()
    data = Splits.in_memory((tr.features, tr.labels), (te.features, te.labels))
    t_fc, r = _timed(lambda: probe(data, cfg))
    n_fit = r["num_fit"]
    # The same grid in scikit-learn's terms: C = 1 / (weight_decay * n); 0 -> no penalty.
    grid = tuple(1.0 / (wd * n_fit) if wd > 0 else 1e6 for wd in DEFAULT_WEIGHT_DECAYS)
    t_sk, s = _timed(
        lambda: sklearn_probe(
            tr.features, tr.labels, te.features, te.labels, cfg.val_fraction, cfg.seed, grid
        )
    )
    print(
        f"probe: featcache {t_fc:.1f} s top-1 {r['test']['top1']:.2f}; sklearn {t_sk:.1f} s "
        f"top-1 {s['test_top1']:.2f}",
        flush=True,
    )
    return "\n".join(
        [
            f"Features: {len(tr.labels)} x {tr.features.shape[1]} train, {len(te.labels)} test "
            f"({store.path.name}: real CIFAR-10 images through a random-init CIFAR ResNet-18 of "
            "width 48). Grid: the 9 weight decays of the probe (sklearn: C = 1/(wd n)), the same "
            "stratified validation split and the same criterion (the lowest validation loss), "
            "then a refit on all training data. What still differs: lbfgs runs every fit to "
            "convergence, where the probe trains its heads together with SGD, stops each at its "
            "lowest validation loss and retrains the chosen one for that many epochs.",
            "",
            "| method | wall (s) | test top-1 | chosen |",
            "| --- | --- | --- | --- |",
            f"| featcache probe (9 heads together) | {t_fc:.1f} | {r['test']['top1']:.2f} | "
            f"wd {r['selected']['weight_decay']:g} |",
            f"| scikit-learn LogisticRegression lbfgs | {t_sk:.1f} | {s['test_top1']:.2f} | "
            f"C {s['C']:.3g} |",
            f"| ratio | {t_sk / t_fc:.1f}x faster | {r['test']['top1'] - s['test_top1']:+.2f} | |",
            "",
            _logreg_rows(tr, te, quick),
        ]
    )


def _logreg_rows(tr, te, quick: bool) -> str:
    """probe --protocol logreg (DINOv2's) against scikit-learn's LogisticRegression over the
    same 45 values of C, split, criterion (validation top-1) and tolerance, warm-started."""
    import warnings

    from featcache.evaluation.baselines import sklearn_logreg
    from featcache.evaluation.data import Splits
    from featcache.evaluation.logreg import C_GRID, TOLERANCE
    from featcache.evaluation.probe import ProbeConfig, probe

    # On this CPU a whole run is hours (45 values of C to a gradient of 1e-6, each side, on
    # 45,000 rows): 10,000 training rows and every fourth value of C, the same for both.
    cs, every = (C_GRID[::8], 10) if quick else (C_GRID[::4], 5)
    tr = type(tr)(features=tr.features[::every], labels=tr.labels[::every], ids=tr.ids[::every])
    data = Splits.in_memory((tr.features, tr.labels), (te.features, te.labels))
    cfg = ProbeConfig(protocol="logreg", cs=cs, device="cpu", cv_below=0)
    t_fc, r = _timed(lambda: probe(data, cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs's convergence warnings at the largest C
        t_sk, s = _timed(lambda: sklearn_logreg(tr.features, tr.labels, te.features, te.labels,
                                                cs, tol=TOLERANCE))  # fmt: skip
    converged = _against_converged(r, tr.features, tr.labels, te.features, te.labels)
    return "\n".join([
        f"**The logistic-regression protocol** (`probe --protocol logreg`, DINOv2's) on every "
        f"{every}th training row ({len(tr.labels):,}): {len(cs)} of DINOv2's 45 values of C (every "
        "fourth, 1e-6 to 1e5), the best validation top-1 on the same split (one split: "
        "--cv-below 0), refit on every training row; L-BFGS in float64 to a gradient of "
        f"{TOLERANCE:g} (scikit-learn's in the features' terms; featcache's there or on its "
        "preconditioned problem, the rows centred, on their principal axes, scaled, whichever "
        "comes first), at most 1,000 iterations a fit, "
        "each C warm-started from the last (scikit-learn: `warm_start=True`, as its "
        "LogisticRegressionCV does), on this CPU. The objective is the refit's mean "
        "cross-entropy + ||W||^2 / (2 C n) on the training rows (lower is closer to the "
        "optimum both seek).",
        "",
        "| method | wall (s) | test top-1 | chosen C | refit objective | refit iterations |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| featcache logreg (SciPy's L-BFGS-B, torch loss) | {t_fc:.1f} | {_our_cells(r)}",
        f"| scikit-learn LogisticRegression lbfgs | {t_sk:.1f} | "
        + _refit_cells(s["test_top1"], s["C"], s["objective"], s["iterations"]),
        f"| ratio | {t_sk / t_fc:.2f}x | {r['test']['top1'] - s['test_top1']:+.2f} | | | |",
        *converged,
        "",
        "Goals: top-1 within 0.1 points of scikit-learn's; at least 5x faster on the CPU. "
        "Where scikit-learn stops at its 1,000 iterations short of the optimum, the refit run "
        "to convergence is the reference for the top-1.",
    ])  # fmt: skip


def _refit_cells(top1, c, objective, iterations) -> str:
    """The logreg tables' last four cells: test top-1, C, the refit's objective, iterations."""
    return f"{top1:.2f} | {c:.3g} | {objective:.6f} | {iterations} |"


def _our_cells(r) -> str:
    sel = r["selected"]
    return _refit_cells(r["test"]["top1"], sel["C"], sel["objective"], sel["epochs"])


def _against_converged(r, xtr, ytr, xte, yte) -> list[str]:
    """Two rows: scikit-learn's refit at featcache's chosen C run to convergence (at most
    20,000 iterations: the optimum both seek), and featcache's difference from it."""
    import warnings

    from featcache.evaluation.baselines import sklearn_refit
    from featcache.evaluation.logreg import TOLERANCE

    sel = r["selected"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, ref = _timed(lambda: sklearn_refit(xtr, ytr, xte, yte, sel["C"], TOLERANCE, 20_000))
    cells = _refit_cells(ref["test_top1"], sel["C"], ref["objective"], ref["iterations"])
    return [
        f"| scikit-learn's refit alone, at most 20,000 iterations | {t:.1f} | {cells}",
        f"| featcache - converged refit | | {r['test']['top1'] - ref['test_top1']:+.2f} | | "
        f"{sel['objective'] - ref['objective']:+.2g} | |",
    ]


def bench_logreg(quick: bool) -> str:
    """DINOv2's whole protocol (its 45 values of C, one 10% split, the refit) on the probe
    section's 50,000 x 384 store, against scikit-learn's refit at the chosen C run to
    convergence: the optimum both seek (scikit-learn's own sweep is hours on this CPU)."""
    from featcache.evaluation.data import Splits
    from featcache.evaluation.logreg import TOLERANCE
    from featcache.evaluation.probe import ProbeConfig, probe
    from featcache.store import Store

    store = Store(big_store())
    tr, te = store.load("train", "pooled"), store.load("test", "pooled")
    every = 5 if quick else 1
    xtr, ytr = tr.features[::every], tr.labels[::every]
    cfg = ProbeConfig(protocol="logreg", device="cpu", cv_below=0)
    t_fc, r = _timed(lambda: probe(Splits.in_memory((xtr, ytr), (te.features, te.labels)), cfg))
    fits = [s["iterations"] for s in r["sweep"]]
    converged = _against_converged(r, xtr, ytr, te.features, te.labels)
    print(f"logreg: featcache {t_fc:.1f} s top-1 {r['test']['top1']:.2f}", flush=True)
    return "\n".join([
        f"`probe --protocol logreg` with its defaults but `--cv-below 0` (DINOv2's 45 values of "
        f"C, 1e-6 to 1e5, chosen by validation top-1 on one stratified 10% split, refit on every "
        f"row) on {len(ytr):,} x {xtr.shape[1]} training features ({store.path.name}) and "
        f"{len(te.labels):,} test; L-BFGS in float64 to a gradient of {TOLERANCE:g}, on this "
        "CPU. The reference: scikit-learn's `LogisticRegression` (lbfgs, same tolerance) at the "
        "chosen C on the same rows, up to 20,000 iterations. The objective: the mean "
        "cross-entropy + ||W||^2 / (2 C n) on the training rows.",
        "",
        "| run | wall (s) | test top-1 | C | refit objective | refit iterations |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| featcache, the whole protocol (45 fits + refit) | {t_fc:.1f} | {_our_cells(r)}",
        *converged,
        "",
        f"The sweep's fits: {sum(fits):,} L-BFGS iterations in all, at most {max(fits)} for one "
        f"C ({sum(f >= cfg.lbfgs_iterations for f in fits)} of 45 stopped at the "
        f"{cfg.lbfgs_iterations:,}-iteration limit).",
        "",
        "Goal: top-1 within 0.1 points of scikit-learn's.",
    ])  # fmt: skip


def bench_smallprobe(quick: bool) -> str:
    """A small store of real weights (efficientnet-lite0, 200 / 100 CIFAR-10 images per class):
    the probe's choice by 5-fold cross-validation, both protocols, against scikit-learn's
    LogisticRegressionCV on the same folds and grid, and the old rule (one 10% split)."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    from featcache.evaluation.data import Splits, stratified_folds
    from featcache.evaluation.logreg import C_GRID
    from featcache.evaluation.probe import DEFAULT_WEIGHT_DECAYS, ProbeConfig, probe
    from featcache.store import Store

    per = (50, 50) if quick else (200, 100)
    out = WORK / f"lite0-{per[0]}-{per[1]}.h5"
    if not out.exists():
        subprocess.run([PY, "-m", "featcache", "extract", "--backbone", "efficientnet-lite0",
                        "--dataset", f"imagefolder:{cifar()}", "--train-per-class", str(per[0]),
                        "--test-per-class", str(per[1]), "--out", str(out), "--no-progress"],
                       check=True)  # fmt: skip
    store = Store(out)
    tr, te = store.load("train", "pooled"), store.load("test", "pooled")
    data = Splits.in_memory((tr.features, tr.labels), (te.features, te.labels))
    rows = []
    for name, cfg in (
        ("sgd, one 10% split (before)", ProbeConfig(cv_below=0)),
        ("sgd, 5-fold cross-validation", ProbeConfig()),
        ("logreg, one 10% split", ProbeConfig(protocol="logreg", cv_below=0)),
        ("logreg, 5-fold cross-validation", ProbeConfig(protocol="logreg")),
    ):
        t, r = _timed(lambda cfg=cfg: probe(data, cfg))
        chosen = r["selected"].get("C", r["selected"]["weight_decay"])
        rows.append((f"featcache probe: {name}", t, r["test"]["top1"], f"{chosen:.3g}"))
    mean, std = tr.features.mean(0), tr.features.std(0) + 1e-6
    ztr, zte = (tr.features - mean) / std, (te.features - mean) / std
    folds = PredefinedSplit(stratified_folds(tr.labels, 5, 0))
    n = len(tr.labels) * 4 // 5
    # As each protocol sees the features: the SGD probe z-scored, logreg as stored.
    grids = {
        "the sgd grid (C = 1/(wd n)), z-scored":
            ([1.0 / (wd * n) if wd > 0 else 1e6 for wd in DEFAULT_WEIGHT_DECAYS], ztr, zte),
        "DINOv2's 45 C, features as stored": (list(C_GRID), tr.features, te.features),
    }  # fmt: skip
    for name, (grid, a, b) in grids.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cv = LogisticRegressionCV(Cs=grid, cv=folds, scoring="accuracy", max_iter=1000)
            t, m = _timed(lambda cv=cv, a=a: cv.fit(a, tr.labels))
        rows.append((f"scikit-learn LogisticRegressionCV, {name}", t,
                     100 * m.score(b, te.labels), f"{float(m.C_[0]):.3g}"))  # fmt: skip
    lines = [
        f"{len(tr.labels)} training / {len(te.labels)} test features ({tr.features.shape[1]}-d, "
        "efficientnet-lite0's real ImageNet weights, CIFAR-10 JPEGs). Cross-validation: 5 "
        "stratified folds, the same for every candidate (scikit-learn gets featcache's folds); "
        "sgd chooses by the folds' mean loss, logreg and scikit-learn by mean accuracy.",
        "",
        "| method | wall (s) | test top-1 | chosen wd / C |",
        "| --- | --- | --- | --- |",
        *[f"| {a} | {t:.1f} | {top1:.2f} | {c} |" for a, t, top1, c in rows],
        "",
        "Goal: featcache's cross-validated probe at least scikit-learn's LogisticRegressionCV "
        "(5 folds, same grid) - 0.3 points.",
    ]
    return "\n".join(lines)


def bench_knn(quick: bool) -> str:
    from sklearn.neighbors import KNeighborsClassifier

    from featcache.evaluation.knn import knn_evaluate, l2_normalize
    from featcache.store import Store

    store = Store(big_store())
    tr, te = store.load("train", "pooled"), store.load("test", "pooled")
    xq, yq = te.features, te.labels
    if quick:
        xq, yq = xq[:2000], yq[:2000]
    k = 20
    t_fc, r = _timed(lambda: knn_evaluate(tr.features, tr.labels, xq, yq, 10, (k,), 0.07), 2)

    def torch_knn():
        a = torch.from_numpy(l2_normalize(tr.features))
        b = torch.from_numpy(l2_normalize(xq))
        votes = []
        for i in range(0, len(b), 2048):
            sim, idx = (b[i : i + 2048] @ a.T).topk(k, dim=1)
            w = (sim / 0.07).exp()
            v = torch.zeros(len(idx), 10).scatter_add_(1, torch.from_numpy(tr.labels)[idx], w)
            votes.append(v.argmax(1))
        return 100 * float((torch.cat(votes).numpy() == yq).mean())

    t_t, top_t = _timed(torch_knn, 2)
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine")
    t_sk, top_sk = _timed(lambda: 100 * clf.fit(tr.features, tr.labels).score(xq, yq))
    print(
        f"knn: featcache {t_fc:.2f} s ({r[0]['top1']:.2f}); torch {t_t:.2f} s ({top_t:.2f}); "
        f"sklearn {t_sk:.2f} s ({top_sk:.2f})",
        flush=True,
    )
    return "\n".join(
        [
            f"{len(yq)} queries x {len(tr.labels)} x {tr.features.shape[1]}, k={k}, best of 2 "
            "(sklearn: one run, majority vote, as it has no exp(sim/T) weighting).",
            "",
            "| method | wall (s) | top-1 |",
            "| --- | --- | --- |",
            f"| featcache knn (faiss, weighted) | {t_fc:.2f} | {r[0]['top1']:.2f} |",
            f"| torch matmul + topk (weighted) | {t_t:.2f} | {top_t:.2f} |",
            f"| scikit-learn KNeighborsClassifier (brute, cosine) | {t_sk:.2f} | {top_sk:.2f} |",
        ]
    )


# ---------------------------------------------------------------------------------------------
# Scaling: time and peak memory at 1x, 4x, 16x images, each run in a fresh process


# A process's peak RSS survives exec: a child started (vfork and exec) from this process starts
# with this process's own peak, gigabytes by the time the scaling section runs. A small helper
# interpreter starts the command instead and reports its wait4 figure.
_PEAK_HELPER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(usage.ru_maxrss, status)
"""


def peak_memory_mib(cmd: list[str]) -> float:
    """Run ``cmd``; the peak resident memory (MiB) of it and of its reaped children."""
    out = subprocess.run([PY, "-c", _PEAK_HELPER, *cmd], check=True, capture_output=True)
    maxrss, status = map(int, out.stdout.split())
    if status != 0:
        raise RuntimeError(f"{cmd} failed with status {status}")
    return maxrss / 1024


def bench_scaling(quick: bool) -> str:
    import statistics

    big_store()  # makes the encoder
    run = WORK / "r18w48-init"
    base = 50 if quick else 200  # images per class at 1x (train split only)
    repeats = 1 if quick else 3  # a process's peak varies by about 10% from run to run
    rows = []
    for mult in (1, 4, 16):
        out = WORK / f"scale-{mult}.h5"
        cmd = _encoder_extract(run, out, "--splits", "train", "--train-per-class", str(base * mult))
        walls, peaks = [], []
        for _ in range(repeats):
            out.unlink(missing_ok=True)
            t = time.perf_counter()
            peaks.append(peak_memory_mib(cmd))
            walls.append(time.perf_counter() - t)
        row = (mult, base * mult * 10, statistics.median(walls), peaks)
        rows.append(row)
        print(f"scaling {mult}x: {row[1]} images, {row[2]:.1f} s, peaks {peaks} MiB", flush=True)
    median = [statistics.median(r[3]) for r in rows]
    lines = [
        "Whole `featcache extract` processes (import, model load, extraction, assembly), "
        f"{repeats} runs per scale; wall: the median; peak resident memory (the larger of "
        "the extract process's and its loader worker's): the median and every run.",
        "",
        "| scale | images | wall (s) | s per 1k images | peak memory (MiB) | every run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (mult, n, wall, peaks), med in zip(rows, median):
        lines.append(
            f"| {mult}x | {n} | {wall:.1f} | {1000 * wall / n:.2f} | {med:.0f} | "
            f"{', '.join(f'{p:.0f}' for p in peaks)} |"
        )
    lines.append(f"\nPeak memory 16x / 1x (medians): {median[-1] / median[0]:.3f}")
    return "\n".join(lines)


def bench_precision(quick: bool) -> str:
    """Reduced precision must not cost accuracy: the same subset extracted in fp32, in bf16,
    and in fp32 into a float16 store (``extract --dtype float16``: half the disk and memory).

    The whole 10,000-image test split: bf16 moves a few percent of the k-NN predictions, so
    a 1,000-image split could not resolve a 0.3-point band (one image is 0.1 point).
    """
    from featcache.evaluation.knn import KnnConfig, l2_normalize, search, weighted_vote
    from featcache.evaluation.methods import run
    from featcache.evaluation.probe import ProbeConfig
    from featcache.extraction.extract import ExtractConfig, extract
    from featcache.store import Store

    train_per_class, test_per_class = (20, 20) if quick else (500, None)
    variants = {"fp32": ("fp32", "float32"), "bf16": ("bf16", "float32"),
                "fp32, float16 store": ("fp32", "float16")}  # fmt: skip
    if "bf16" not in precisions("cpu"):  # emulated, 7x slower than fp32: no one extracts so
        del variants["bf16"]
    rows, stores = {}, {}
    for name, (precision, dtype) in variants.items():
        out = WORK / f"precision-lite0-{precision}-{dtype}.h5"
        out.unlink(missing_ok=True)
        cfg = ExtractConfig(
            backbone="efficientnet-lite0",
            dataset=f"imagefolder:{cifar()}",
            out=str(out),
            train_per_class=train_per_class,
            test_per_class=test_per_class,
            precision=precision,
            dtype=dtype,
            progress=False,
        )
        extract(cfg)
        probe = run(out, "probe", ProbeConfig())["test"]["top1"]
        knn = run(out, "knn", KnnConfig(k=(20,)))["results"][0]["top1"]
        rows[name] = (probe, knn)
        stores[name] = Store(out)
        print(f"precision {name}: probe {probe:.2f} knn {knn:.2f}", flush=True)

    def knn_predictions(store):
        train, test = store.load("train", "pooled"), store.load("test", "pooled")
        sims, idx = search(l2_normalize(train.features), l2_normalize(test.features), 20)
        return weighted_vote(sims, train.labels[idx], 10, KnnConfig.temperature).argmax(1)

    def test_features(name):
        return l2_normalize(stores[name].load("test", "pooled").features)

    reference, predicted = test_features("fp32"), knn_predictions(stores["fp32"])
    n_train, n_test = len(stores["fp32"].read("train", "labels")), len(reference)
    (p32, k32) = rows["fp32"]
    lines = [
        f"efficientnet-lite0 (its real weights), {n_train} CIFAR training images "
        f"({train_per_class} per class) and {n_test} test images, one store per variant "
        "(`--precision` of the forward, `--dtype` of the stored features); probe and k=20 "
        "k-NN test top-1.",
        "",
        "| store | probe top-1 | k-NN top-1 | probe - fp32 | k-NN - fp32 |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {p:.2f} | {k:.2f} | {p - p32:+.2f} | {k - k32:+.2f} |"
        for name, (p, k) in rows.items()
    ]
    lines.append("")
    for name in list(variants)[1:]:
        cos = (reference * test_features(name)).sum(1)
        moved = int((knn_predictions(stores[name]) != predicted).sum())
        lines.append(
            f"Test features, {name} against fp32: cosine mean {cos.mean():.6f}, min "
            f"{cos.min():.6f}; k-NN predictions that differ: {moved} of {n_test}."
        )
    return "\n".join(lines)


def _measured(cmd: list[str], out: Path) -> dict:
    """Wall time, peak resident memory and top-1 of one featcache command (its own process)."""
    t = time.perf_counter()
    peak = peak_memory_mib(cmd)
    result = json.loads(out.read_text())
    top1 = result["test"]["top1"] if "test" in result else result["results"][0]["top1"]
    return {
        "seconds": round(time.perf_counter() - t, 2),
        "peak_rss_bytes": int(peak * 2**20),
        "top1": top1,
    }


def bench_large(quick: bool, json_path: str | None = None) -> str:
    """A store of ImageNet-1k's shape (float16), k-NN and probe with and without a bound."""
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic import write_synthetic

    scale = 16 if quick else 1
    rows, test, dim, classes = 1_281_167 // scale, 50_000 // scale, 384, 1000
    store = WORK / f"large-{rows}.h5"
    t = time.perf_counter()
    reused = store.exists()
    if not reused:
        write_synthetic(store, rows, test, dim, classes, dtype="float16")
    written = (
        "reused from an earlier run" if reused else f"written in {time.perf_counter() - t:.0f} s"
    )
    feature_bytes = (rows + test) * dim * 2
    budget = "1GiB"
    runs = {}
    epochs = 5 if quick else 3
    methods = {
        "knn": ["--k", "20"],
        "probe": ["--weight-decays", "1e-4", "--epochs", str(epochs), "--no-views",
                  "--device", "cpu"],
    }  # fmt: skip

    def measure(method: str, path: Path, bounded: bool) -> dict:
        out = WORK / f"large-{method}-{bounded}.json"
        cmd = [PY, "-m", "featcache", method, "--store", str(path), *methods[method]]
        cmd += ["--json", str(out)] + (["--max-memory", budget] if bounded else [])
        result = _measured(cmd, out)
        print(f"large {method} {path.name} bounded={bounded}: {result}", flush=True)
        return result

    for method in methods:
        for bounded in (False, True):
            runs[method, bounded] = measure(method, store, bounded)
    # Time against training rows: the bounded runs on 1/8 (not --quick: some of its 1000
    # classes would have one row, too few for the probe's validation), 1/4 and 1/2 of them,
    # with the same test rows.
    scaling = []
    for part in (4, 2) if quick else (8, 4, 2):
        smaller = WORK / f"large-{rows // part}-{test}.h5"
        if not smaller.exists():
            write_synthetic(smaller, rows // part, test, dim, classes, dtype="float16")
        scaling.append({"rows": rows // part, **{m: measure(m, smaller, True) for m in methods}})
    scaling.append({"rows": rows, **{m: runs[m, True] for m in methods}})
    report = {
        "rows": rows,
        "test_rows": test,
        "dim": dim,
        "classes": classes,
        "feature_bytes": feature_bytes,
        "max_memory": budget,
        "store": written,
    }
    for method in ("knn", "probe"):
        bounded, free = runs[method, True], runs[method, False]
        report[method] = {**bounded, "top1_in_memory": free["top1"], "in_memory": free}
    report["scaling"] = scaling
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    limit = feature_bytes / 2 + 2**30
    lines = [
        f"A synthetic float16 store of {rows:,} x {dim} training and {test:,} test features, "
        f"{classes} classes (class-conditional Gaussians, `bench/synthetic.py`), "
        f"{feature_bytes / 2**30:.2f} GiB of features, {written}. Each run is "
        f"its own `featcache` process; the probe: one weight decay, {epochs} epochs.",
        "",
        "| method | --max-memory | wall (s) | peak RSS (MiB) | top-1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (method, bounded), r in runs.items():
        lines.append(
            f"| {method} | {budget if bounded else '-'} | {r['seconds']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['top1']:.2f} |"
        )
    for method in ("knn", "probe"):
        b, f = runs[method, True], runs[method, False]
        lines.append(
            f"\n{method}: bounded / in-memory wall {b['seconds'] / f['seconds']:.2f}x; bounded "
            f"peak {b['peak_rss_bytes'] / 2**20:.0f} MiB against the goal's "
            f"{limit / 2**20:.0f} MiB (half the features + 1 GiB); top-1 "
            f"{b['top1'] - f['top1']:+.2f} points."
        )
    lines += [
        "",
        f"Time against training rows, `--max-memory {budget}`, the same {test:,} test rows; "
        "per 100k rows: the added seconds over the added rows from the scale above (the "
        "process's start and the test rows' fixed cost cancel):",
        "",
        "| training rows | knn wall (s) | knn s per 100k more rows | probe wall (s) | "
        "probe s per 100k more rows |",
        "| --- | --- | --- | --- | --- |",
    ]
    for prev, r in zip([None, *scaling], scaling):
        cells = []
        for m in methods:
            cells.append(f"{r[m]['seconds']:.1f}")
            if prev is None:
                cells.append("-")
            else:
                added = (r[m]["seconds"] - prev[m]["seconds"]) / (r["rows"] - prev["rows"])
                cells.append(f"{1e5 * added:.2f}")
        lines.append(f"| {r['rows']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_LINEAR_CKA = """
import json, sys, time
from featcache.evaluation.similarity import (SimilarityConfig, centred, feature_sets,
                                             linear_cka, match)
t = time.perf_counter()
sets = feature_sets(sys.argv[1]) + feature_sets(sys.argv[2])
cfg = SimilarityConfig()
match(sets, cfg)
value = linear_cka(sets[0], sets[1], cfg.split, centred(sets[0], cfg.split),
                   centred(sets[1], cfg.split))
with open(sys.argv[3], "w") as f:
    json.dump({**value, "seconds": time.perf_counter() - t}, f)
"""


def bench_similarity(quick: bool) -> str:
    """Linear CKA of two 50,000 x 768 sets (matched by id, read in chunks), in a fresh
    process: its time and peak memory; then the whole command (RBF CKA and RSA on 5,000)."""
    import h5py
    import numpy as np

    sys.path.insert(0, str(REPO / "bench"))
    from synthetic import write_synthetic

    n = 5_000 if quick else 50_000
    a, b = WORK / f"sim-a-{n}.h5", WORK / f"sim-b-{n}.h5"
    if not b.exists():
        write_synthetic(a, 1000, n, 768, 100)
        tmp = b.with_suffix(".tmp")
        tmp.write_bytes(a.read_bytes())
        q = np.linalg.qr(np.random.default_rng(1).normal(size=(768, 768)))[0].astype(np.float32)
        with h5py.File(tmp, "r+") as f:  # a rotated, noisier copy: CKA below 1, known shape
            x = f["test"]["features"]["x"]
            for i in range(0, n, 8192):
                rows = x[i : i + 8192]
                noise = np.random.default_rng(i).normal(size=rows.shape).astype(np.float32)
                x[i : i + 8192] = np.tanh(rows @ q) + 0.5 * noise
        tmp.rename(b)
    measured = WORK / "linear-cka.json"  # timed inside, peak memory around: one process
    peak_linear = peak_memory_mib([PY, "-c", _LINEAR_CKA, str(a), str(b), str(measured)])
    linear = json.loads(measured.read_text())
    result = WORK / "sim.json"
    t = time.perf_counter()
    cmd = [PY, "-m", "featcache", "similarity", str(a), str(b), "--json", str(result)]
    peak_all = peak_memory_mib(cmd)
    whole = time.perf_counter() - t
    r = json.loads(result.read_text())
    return "\n".join([
        f"Two stores of {n:,} x 768 float32 test features (synthetic; the second a rotated, "
        "tanh-squashed, noisier copy of the first), matched by id; each measurement a fresh "
        "process on this CPU.",
        "",
        "| measurement | seconds | peak MiB | value |",
        "| --- | --- | --- | --- |",
        f"| linear CKA (biased and unbiased, every row; after imports) | "
        f"{linear['seconds']:.2f} | {peak_linear:.0f} | {linear['linear_cka']:.4f} / "
        f"{linear['linear_cka_unbiased']:.4f} |",
        f"| `featcache similarity A B` (+ RBF CKA and RSA on {r['sample_images']:,}) | "
        f"{whole:.1f} (method {r['seconds']:.1f}) | {peak_all:.0f} | RBF {r['rbf_cka'][0][1]:.4f}, "
        f"RSA {r['rsa'][0][1]:.4f} |",
        "",
        "Goal (linear CKA): under 5 s on 2 cores, peak under 1 GiB.",
    ])  # fmt: skip


def _clip_tokenizer():
    """transformers' CLIPTokenizer with CLIP's own BPE (OpenAI's bpe_simple_vocab_16e6, as the
    open_clip_torch package ships it: the Hub's copy is out of reach here), so that prompts
    have their real token counts."""
    import gzip
    import importlib.util

    import transformers

    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("--only zeroshot needs CLIP's BPE vocabulary: pip install --no-deps "
                         "open_clip_torch")  # fmt: skip
    path = Path(list(found.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode().split("\n")[1 : 49152 - 256 - 2 + 1]
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte alphabet
    extra = iter(range(256, 512))
    chars = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    words = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab = {w: i for i, w in enumerate([*words, "<|startoftext|>", "<|endoftext|>"])}
    return transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])


def bench_zeroshot(quick: bool) -> str:
    """featcache zeroshot on 10,000 CIFAR-10 test images once the text tower is loaded: the
    classifier made (10 classes x CLIP's 18 templates through the text tower) and the store
    scored, through featcache.zeroshot with the tower already in memory."""
    import transformers

    import featcache
    from featcache.backbones import get_spec
    from featcache.backbones.hf_models import load_text_tower
    from featcache.extraction import zeroshot as zs
    from featcache.extraction.extract import ExtractConfig, extract
    from featcache.store import Store

    per_class = 100 if quick else 1000
    weights = WORK / "clip-b16-text"  # CLIP ViT-B/16's text tower (CLIPTextConfig's defaults)
    if not (weights / "model.safetensors").exists():
        tokenizer = _clip_tokenizer()
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
        config = transformers.CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), eos_token_id=len(tokenizer) - 1),
            vision_config=vision, projection_dim=512,
        )  # fmt: skip
        transformers.CLIPModel(config).save_pretrained(weights)  # random weights
        tokenizer.save_pretrained(weights)
        transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
            do_center_crop=True, resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
            image_std=[0.26862954, 0.26130258, 0.27577711],
        ).save_pretrained(weights)  # fmt: skip
    store = WORK / f"zeroshot-{per_class}.h5"
    if not store.exists():
        extract(ExtractConfig(backbone="hf:clip-b16-text", weights=str(weights),
                              dataset=f"imagefolder:{cifar()}", out=str(store), splits=("test",),
                              test_per_class=per_class, progress=False))  # fmt: skip
    t = time.perf_counter()
    tower = load_text_tower(get_spec("hf:clip-b16-text", str(weights)), weights)
    load = time.perf_counter() - t
    names = sorted(p.name for p in (cifar() / "test").iterdir())
    texts = [p.format(c=c) for c in names for p in zs.OPENAI_CIFAR]
    tokens = len(tower.tokenizer(texts, padding=True)["input_ids"][0])
    made, runs = [], []
    loaded = zs.load_text_tower
    zs.load_text_tower = lambda *args: tower  # the tower in memory: the goal's starting line
    try:
        for _ in range(3):
            t = time.perf_counter()
            tower.embed(texts)
            made.append(time.perf_counter() - t)
            t = time.perf_counter()
            featcache.zeroshot(store, weights=str(weights))
            runs.append(time.perf_counter() - t)
    finally:
        zs.load_text_tower = loaded
    images = len(Store(store).read("test", "labels"))
    return "\n".join([
        f"`featcache.zeroshot` on {images:,} CIFAR-10 test images (a store of CLIP's 512-d "
        "`embed`), after the text tower is loaded: CLIP ViT-B/16's text tower (12 layers, "
        f"width 512; random weights) with CLIP's own BPE ({len(texts)} prompts, {tokens} "
        "tokens each padded), 10 classes x CLIP's 18 templates; median of 3.",
        "",
        "| step | seconds |",
        "| --- | --- |",
        f"| loading the text tower (not in the goal) | {load:.2f} |",
        f"| the prompts through the text tower alone | {sorted(made)[1]:.2f} |",
        f"| `featcache.zeroshot(store)`: classifier made and written, store scored | "
        f"{sorted(runs)[1]:.2f} |",
        "",
        "Goal: under 2 s after the text tower is loaded.",
    ])  # fmt: skip


def bench_pipeline(quick: bool) -> str:
    import pipeline

    return pipeline.bench_pipeline(quick, cifar(), WORK)


def bench_resize(quick: bool) -> str:
    import pipeline

    return pipeline.bench_resize(quick, cifar())


def bench_inputs(quick: bool) -> str:
    import inputs

    return inputs.bench_inputs(quick, cifar(), WORK)


SECTIONS = {
    "pipeline": bench_pipeline,
    "resize": bench_resize,
    "inputs": bench_inputs,
    "extract": bench_extract,
    "precision": bench_precision,
    "compile": bench_compile,
    "probe": bench_probe,
    "logreg": bench_logreg,
    "knn": bench_knn,
    "scaling": bench_scaling,
    "large": bench_large,
    "similarity": bench_similarity,
    "smallprobe": bench_smallprobe,
    "zeroshot": bench_zeroshot,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="the large section's figures as JSON")
    a = p.parse_args()
    if a.child:
        return child(*a.child)
    WORK.mkdir(parents=True, exist_ok=True)
    parts = [
        "# featcache benchmarks",
        "",
        f"Last command: `{' '.join(['python', 'bench/run.py', *sys.argv[1:]])}` (`make bench` "
        "runs every section); each section says when and on which machine it was measured: "
        "compare figures within a section only.",
    ]
    for name in a.only.split(","):
        t = time.perf_counter()
        parts += [
            "",
            f"## {name}",
            "",
            SECTIONS[name](a.quick, a.json) if name == "large" else SECTIONS[name](a.quick),
            f"\n(section took {time.perf_counter() - t:.0f} s; measured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}, at commit "
            f"{commit()}; command `python bench/run.py --only {name}"
            f"{' --quick' if a.quick else ''}`)",
        ]
    text = "\n".join(parts) + "\n"
    out = Path(a.out)
    if out.exists():  # keep the sections not rerun (and those of other scripts: the GPU's)
        old = out.read_text().split("\n## ")
        kept = [staleness(sec) for sec in old[1:] if sec.split("\n", 1)[0] not in a.only.split(",")]
        text = text.rstrip("\n") + "".join("\n\n## " + sec.rstrip("\n") for sec in kept) + "\n"
    out.write_text(text)
    print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()

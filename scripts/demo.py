"""`make demo`: efficientnet-lite0 (real ImageNet weights, offline) on a CIFAR-10 subset.

Runs the three real commands (extract, probe, knn) and prints a short results table. Data comes
from ../shared/data/cifar10-jpeg when present (unpacked once into data/), else the official
archive is downloaded. Outputs land in runs/demo/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "cifar10-jpeg"
TRAIN_PER_CLASS, TEST_PER_CLASS = 500, 100


def dataset() -> str:
    if (SHARED / "train.tar.gz").is_file():
        root = REPO / "data" / "cifar10-jpeg"
        for split in ("train", "test"):
            if not (root / split / "truck").is_dir():
                print(f"unpacking {SHARED / split}.tar.gz into {root} ...", flush=True)
                root.mkdir(parents=True, exist_ok=True)
                with tarfile.open(SHARED / f"{split}.tar.gz") as tar:
                    tar.extractall(root, filter="data")
        return f"imagefolder:{root}"
    return "cifar10"


def featcache(*args: str) -> None:
    cmd = [sys.executable, "-m", "featcache", *args]
    print("$ featcache " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    out = REPO / "runs" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    store = out / "efficientnet-lite0.h5"
    start = time.perf_counter()
    featcache(
        "extract",
        "--backbone",
        "efficientnet-lite0",
        "--dataset",
        dataset(),
        "--train-per-class",
        str(TRAIN_PER_CLASS),
        "--test-per-class",
        str(TEST_PER_CLASS),
        "--out",
        str(store),
    )
    featcache(
        "probe",
        "--store",
        str(store),
        "--json",
        str(out / "probe.json"),
        "--plot",
        str(out / "probe.png"),
    )
    featcache("knn", "--store", str(store), "--json", str(out / "knn.json"))
    probe = json.loads((out / "probe.json").read_text())
    knn = json.loads((out / "knn.json").read_text())

    print(
        f"\nefficientnet-lite0 on CIFAR-10 ({TRAIN_PER_CLASS} train / {TEST_PER_CLASS} test "
        f"images per class, upscaled to 224), {time.perf_counter() - start:.0f} s in all"
    )
    print(f"{'method':28s} {'top-1':>7s} {'top-3':>7s}")
    t = probe["test"]
    print(
        f"{'linear probe (wd ' + format(probe['selected']['weight_decay'], 'g') + ')':28s} "
        f"{t['top1']:6.2f}% {t['top3']:6.2f}%"
    )
    for r in knn["results"]:
        print(f"{'k-NN, k=' + str(r['k']):28s} {r['top1']:6.2f}% {r['top3']:6.2f}%")
    print(f"\nstore {store}; curves {out / 'probe.png'}")


if __name__ == "__main__":
    main()

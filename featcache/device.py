"""Resolving --device and --precision to what this machine offers, and the device-specific
fast paths, each decided here from what the device supports.

torch is imported by the functions that use it: the CLI reads ``DEVICES`` and ``PRECISIONS``
for its options and must start without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING

from featcache.errors import ArgumentError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str) -> torch.device:
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise ArgumentError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError("--device cuda asked, but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def rank_device(device: torch.device) -> torch.device:
    """The GPU this process drives, with its index: under torchrun the one of its LOCAL_RANK
    (modulo the GPUs it sees, for launchers that give each process only its own), else the
    first (``cuda`` -> ``cuda:N``); an explicit index and the CPU stay as they are.

    An index is what ``torch.cuda.set_device`` and nccl's ``device_id`` take.
    """
    import torch

    if device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_workers(device: torch.device) -> int:
    """Loader processes: none on the CPU, whose cores the model and the resize need (on 2
    cores a worker made no difference to efficientnet-lite0, 121 and 123 images/s, and cost
    the pipeline without a model 18%: BENCHMARKS.md, pipeline); up to 8 feeding a GPU."""
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def resolve_precision(precision: str, device: torch.device, train: bool = False) -> str:
    """``auto``: bf16 (fp16 on GPUs without it) on CUDA; on the CPU fp32 for extraction and
    bf16 for training where the CPU has native bf16.

    Extraction defaults to fp32 on the CPU because stores are reference features; bf16 is
    faster there on CPUs with native support and available with --precision bf16.
    """
    import torch

    if precision not in PRECISIONS:
        raise ArgumentError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ArgumentError("--precision fp16 is not supported on the CPU; use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if train and cpu_has_native_bf16() else "fp32"


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS at once.

    A CPU forward allocates and frees tens of MB of activations per batch; by default glibc
    serves those with mmap/munmap, so every batch page-faults its memory in again (half the
    CPU time went to the kernel: 77 vs 130 images/s for efficientnet-lite0 in bf16 on 2 cores).
    Raising the mmap and trim thresholds (mallopt) removes that. No-op off glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def release_freed_memory() -> None:
    """Return the freed memory glibc kept to the OS; call it before forking loader workers.

    Kept pages are shared copy-on-write with a forked child, and the parent's next forward
    then copies them page by page: the first efficientnet-lite0 batch after the loader's fork
    took 2.9 s instead of 0.6 s. Trimmed first, they come back as plain fresh pages once.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """This process's resident set size (Linux), or None where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapGuard:
    """Bounds the memory glibc keeps (keep_freed_memory) while an extraction runs.

    With a loader worker feeding batches, the kept heap fragments slowly: the resident set of
    a CIFAR extraction grew from 0.9 to 1.7 GB over 50,000 images (flat without the worker).
    ``check()`` after each shard returns the freed memory (malloc_trim) once the resident set
    exceeds ``slack`` times its size after the first shard: a batch's page faults, rarely.
    """

    def __init__(self, slack: float = 1.1):
        self.slack, self.base = slack, None

    def check(self) -> None:
        rss = resident_bytes()
        if rss is None:
            return
        if self.base is None:
            self.base = rss
        elif rss > self.slack * self.base:
            release_freed_memory()


def resize_kernel(device: torch.device) -> str:
    """Who makes PIL's resized images on ``device`` (featcache.preprocessing), each exact:
    ``pil``, PIL itself on threads (the CPU); ``triton``, fused kernels doing PIL's int32
    arithmetic (CUDA, where Triton is installed, as with every CUDA build of torch);
    ``torch``, float64 products, on any other device."""
    if device.type == "cpu":
        return "pil"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def pads_batches(device: torch.device) -> bool:
    """Whether the last batch of a run is padded to the batch size: on a GPU, where cuDNN and
    cuBLAS autotune for each new shape (and a padded row costs nothing measurable); on the
    CPU a padded row costs as much as a real one."""
    return device.type == "cuda"


def start_device(device: torch.device) -> threading.Thread:
    """Make CUDA's context and load cuDNN in a thread, while the caller lists the dataset and
    loads the model; ``join()`` it before the device is used. A finished thread elsewhere."""
    import torch

    def init():
        if device.type == "cuda":
            x = torch.zeros(1, 1, 8, 8, device=device)
            torch.nn.functional.conv2d(x, torch.zeros(1, 1, 3, 3, device=device))
            torch.cuda.synchronize(device)

    thread = threading.Thread(target=init, name="featcache-device", daemon=True)
    thread.start()
    return thread


def freezing_pays(device: torch.device) -> bool:
    """Whether TorchScript freezing of CNN entries speeds up inference on this device.

    On the CPU it folds BatchNorm into the convolutions (1.36x for efficientnet-lite0 in fp32);
    on a GPU cuDNN and autocast run the eager model, and freezing was never measured there.
    """
    return device.type == "cpu"


@contextlib.contextmanager
def inference_backends(device: torch.device, precision: str):
    """Backend settings for a frozen forward on ``device``, restored afterwards.

    On CUDA: fp32 means IEEE fp32 (PyTorch lets cuDNN convolutions use TF32 by default, which
    keeps 10 mantissa bits; stores are reference features), and cuDNN picks the fastest
    algorithm for the batch shape, which repeats for the whole run. Nothing changes on the CPU.
    """
    import torch

    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.allow_tf32, torch.get_float32_matmul_precision()
    cudnn.benchmark = True
    if precision == "fp32":
        cudnn.allow_tf32 = False  # the legacy flag: the new per-op API breaks its readers
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def autocast(device: torch.device, precision: str):
    import torch

    return torch.autocast(
        device_type=device.type,
        dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision],
        enabled=precision != "fp32",
    )

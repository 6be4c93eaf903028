import os

import pytest
import torch

from featcache import device
from featcache.device import HeapGuard, resolve_device, resolve_precision


def test_precision_defaults_and_refusals():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"  # stores are reference features
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", cpu)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_heap_guard_trims_only_past_the_slack(monkeypatch):
    rss = iter([1000, 1050, 1099, 1101, 1000])
    trims = []
    monkeypatch.setattr(device, "resident_bytes", lambda: next(rss))
    monkeypatch.setattr(device, "release_freed_memory", lambda: trims.append(1))
    guard = HeapGuard(slack=1.1)
    for _ in range(5):
        guard.check()
    assert len(trims) == 1  # only 1101 > 1.1 x the first shard's 1000


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_resident_bytes_reads_this_process():
    import mmap

    before = device.resident_bytes()
    block = mmap.mmap(-1, 64 * 2**20)  # fresh pages (malloc might reuse resident ones)
    for page in range(0, len(block), 4096):
        block[page] = 1  # touched: now resident
    grown = device.resident_bytes() - before
    block.close()
    assert before > 10 * 2**20  # a Python with torch holds well over 10 MiB
    assert 60 * 2**20 < grown < 70 * 2**20, grown


def test_default_workers_leave_the_cpu_to_the_model(monkeypatch):
    """None on the CPU; for a GPU every core but one, at least one and at most eight."""
    assert device.default_workers(torch.device("cpu")) == 0
    for cores, workers in ((1, 1), (2, 1), (4, 3), (9, 8), (64, 8), (None, 1)):
        monkeypatch.setattr(device.os, "cpu_count", lambda c=cores: c)
        assert device.default_workers(torch.device("cuda")) == workers, cores


def test_each_torchrun_process_drives_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    # torch.cuda.set_device and nccl's device_id refuse a CUDA device without an index.
    assert device.rank_device(torch.device("cuda")) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device.rank_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert device.rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # explicit
    assert device.rank_device(torch.device("cpu")) == torch.device("cpu")
    # A launcher that shows each process only its own GPU: LOCAL_RANK 3 sees one, cuda:0.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device.rank_device(torch.device("cuda")) == torch.device("cuda", 0)


def test_fp32_on_cuda_means_ieee_fp32_and_settings_are_restored():
    """cuDNN convolutions default to TF32 (10 mantissa bits): not for fp32 stores. The flags
    are plain settings, so this runs without a GPU."""
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark, cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as a user may have set it
    try:
        with device.inference_backends(torch.device("cuda"), "fp32"):
            assert not cudnn.allow_tf32 and cudnn.benchmark
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        assert (cudnn.benchmark, cudnn.allow_tf32) == before[:2]
        with device.inference_backends(torch.device("cuda"), "bf16"):
            assert cudnn.allow_tf32 == before[1] and cudnn.benchmark
        with device.inference_backends(torch.device("cpu"), "fp32"):
            assert (cudnn.benchmark, cudnn.allow_tf32) == before[:2]
    finally:
        torch.set_float32_matmul_precision(before[2])

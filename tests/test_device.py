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


def test_resident_bytes_reads_this_process():
    rss = device.resident_bytes()
    assert rss is None or rss > 10 * 2**20  # a Python with torch holds well over 10 MiB


def test_default_workers_leave_the_cpu_to_the_model():
    assert device.default_workers(torch.device("cpu")) == 1
    assert 1 <= device.default_workers(torch.device("cuda")) <= 8

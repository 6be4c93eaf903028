"""Crash safety proven with real processes and real signals (kill -9), a full disk (ENOSPC
injected at the k-th commit) and readers racing a writer. Fault hooks live in tinycli.py."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import pytest
from conftest import TINYCLI, assert_equal_stores, start, tiny_extract

SHARDS = 24  # 36 train + 12 test images in shards of 2


def _args(folder, out, *extra):
    return tiny_extract(folder, out, "--batch-size", 2, "--shard-size", 2, *extra)


def _wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("the condition never held")
        time.sleep(0.02)


def _kill(p):
    os.kill(p.pid, signal.SIGKILL)
    p.wait()


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(TINYCLI), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _reader_sees_no_store(out):
    for cmd in (("info", out), ("knn", "--store", out, "--k", "1")):
        r = _cli(*cmd)
        assert r.returncode == 1 and "does not exist" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def _kill_points(folder, out, parts, rng, n_random):
    """Kill -9 the same extraction again and again at different points; returns how many."""
    kills = 0
    mark = out.with_name("stalled")
    # During shard writes: the temporary file is written, the rename has not happened.
    for k in (2, 3, 2):
        mark.unlink(missing_ok=True)
        p = start(
            _args(folder, out), FEATCACHE_TEST_STALL=f"commit:{k}", FEATCACHE_TEST_MARK=str(mark)
        )
        _wait_for(mark.exists)
        _reader_sees_no_store(out)  # a reader started mid-write never sees a store
        _kill(p)
        kills += 1
    # At random moments between batches and writes (a shard takes about 0.4 s here).
    for _ in range(n_random):
        before = len(list(parts.glob("*-*.h5")))
        if before >= SHARDS - 1:
            break  # leave work for the assembly kills below
        p = start(_args(folder, out), FEATCACHE_TEST_DELAY="0.2")
        _wait_for(lambda p=p, n=before: len(list(parts.glob("*-*.h5"))) > n or p.poll() is not None)
        time.sleep(rng.uniform(0, 0.3))
        _kill(p)
        kills += 1
        assert not out.exists()
    # During assembly, twice: the store must not appear, half-written or otherwise.
    for _ in range(2):
        mark.unlink(missing_ok=True)
        p = start(
            _args(folder, out), FEATCACHE_TEST_STALL="assemble", FEATCACHE_TEST_MARK=str(mark)
        )
        _wait_for(mark.exists)
        assert list(out.parent.glob(f".{out.name}.tmp-*"))  # the half-written file is hidden
        _reader_sees_no_store(out)
        _kill(p)
        kills += 1
    return kills


def _run_kill_test(image_folder, tmp_path, n_random):
    ref = tmp_path / "ref.h5"
    assert subprocess.run(_args(image_folder, ref), capture_output=True).returncode == 0
    out = tmp_path / "s.h5"
    parts = tmp_path / "s.h5.parts"
    kills = _kill_points(image_folder, out, parts, random.Random(0), n_random)
    assert kills >= min(10, n_random + 5) and not out.exists()
    final = start(_args(image_folder, out))
    log = final.communicate(timeout=120)[0]
    assert final.returncode == 0, log
    assert "resumed from shards" in log
    assert not list(tmp_path.glob(".s.h5.tmp-*")) and not parts.exists()  # nothing left over
    assert_equal_stores(out, ref)


def test_kill_9_at_eleven_points_then_resume_equals_uninterrupted(image_folder, tmp_path):
    _run_kill_test(image_folder, tmp_path, n_random=6)


@pytest.mark.slow
def test_kill_9_at_many_more_points(image_folder, tmp_path):
    _run_kill_test(image_folder, tmp_path, n_random=25)


@pytest.mark.parametrize("k", [2, 5, SHARDS + 2])  # a shard early, a shard later, the store
def test_full_disk_is_a_clear_error_and_the_rerun_completes(image_folder, tmp_path, k):
    ref = tmp_path / "ref.h5"
    assert subprocess.run(_args(image_folder, ref), capture_output=True).returncode == 0
    out = tmp_path / "s.h5"
    r = subprocess.run(
        _args(image_folder, out),
        env={**os.environ, "FEATCACHE_TEST_ENOSPC": str(k)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "disk full" in r.stderr and "Traceback" not in r.stderr
    shards = sorted((tmp_path / "s.h5.parts").glob("*-*.h5"))
    assert len(shards) == k - 2  # the spec, then k - 2 shards committed before the failure
    for s in shards:  # committed shards are intact
        with h5py.File(s, "r") as f:
            assert len(f["ids"]) == 2
    assert not list((tmp_path / "s.h5.parts").glob("*.tmp")) and not out.exists()
    r = subprocess.run(_args(image_folder, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{(k - 2) * 2} resumed from shards" in r.stdout or k == 2
    assert_equal_stores(out, ref)


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of its own (a 4 MiB tmpfs) that a test can fill up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _leave_free(disk, pages: int) -> None:
    """Fill the disk up to ``pages`` free 4 KiB pages (tmpfs counts whole pages per file)."""
    (disk / "filler").unlink(missing_ok=True)
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - pages * 4096))


def _pages(nbytes: int) -> int:
    return -(-nbytes // 4096)


@pytest.mark.parametrize("where", ["shard", "store"])
def test_a_real_full_disk_inside_hdf5_is_a_clear_error_and_the_rerun_completes(
    image_folder, tmp_path, small_disk, where
):
    """ENOSPC from HDF5's own write or close (not an injected rename): at the 2nd shard, and
    while assembling the store once every shard is committed."""
    import numpy as np

    from featcache.store import ShardedWriter

    ref = tmp_path / "ref.h5"
    assert subprocess.run(_args(image_folder, ref), capture_output=True).returncode == 0
    probe = ShardedWriter(tmp_path / "probe.h5", {"probe": 1})  # a shard's size on disk
    probe.begin()
    zeros = np.zeros((2, 16), np.float32)
    arrays = {"features/pooled": zeros, "features/maxpool": zeros}
    probe.write_shard("train", 0, ["cat/0000.png"] * 2, [0, 0], arrays, [], 0.1)
    shard = _pages(os.path.getsize(probe.shard_path("train", 0)))
    probe.close()
    if where == "shard":  # the spec and the first shard fit, the second does not
        free = 1 + shard + shard // 2
    else:  # every shard fits, half the store does
        free = 1 + SHARDS * shard + _pages(os.path.getsize(ref)) // 2
    out = small_disk / "s.h5"
    _leave_free(small_disk, free)
    r = subprocess.run(_args(image_folder, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    what = f"file {out}.parts/train-000001.h5" if where == "shard" else f"store {out}"
    assert f"disk full while writing the {what}" in r.stderr and "shards finished" in r.stderr
    shards = sorted((small_disk / "s.h5.parts").glob("*-*.h5"))
    assert len(shards) == (1 if where == "shard" else SHARDS)
    for s in shards:  # committed shards are intact
        with h5py.File(s, "r") as f:
            assert len(f["ids"]) == 2
    assert not list(small_disk.rglob("*.tmp*")) and not out.exists()  # no half-written file
    (small_disk / "filler").unlink()  # space freed: the same command finishes the work
    r = subprocess.run(_args(image_folder, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{len(shards) * 2} resumed from shards" in r.stdout
    assert_equal_stores(out, ref)


def _extract_tiny(folder, out):
    from featcache.extraction.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        backbone="test-tiny",
        dataset=f"imagefolder:{folder}",
        out=str(out),
        workers=0,
        batch_size=2,
        shard_size=2,
        progress=False,
    )
    return extract(cfg)


def test_enospc_when_a_shard_is_flushed_loses_nothing(image_folder, tmp_path, monkeypatch):
    """Where a tmpfs cannot be mounted: the disk fills while the 2nd shard is fsynced (where
    delayed allocation reports it), in process."""
    from featcache import store
    from featcache.errors import StoreError

    ref = _extract_tiny(image_folder, tmp_path / "ref.h5").path
    fsync = os.fsync

    def full_at_second_shard(fd):
        if "train-000001.h5." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(store.os, "fsync", full_at_second_shard)
    out = tmp_path / "s.h5"
    with pytest.raises(StoreError, match="disk full while writing the file .*train-000001.h5"):
        _extract_tiny(image_folder, out)
    parts = tmp_path / "s.h5.parts"
    assert [p.name for p in sorted(parts.glob("*-*.h5"))] == ["train-000000.h5"]
    assert not [p for p in parts.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(store.os, "fsync", fsync)
    assert _extract_tiny(image_folder, out).resumed_images == 2
    assert_equal_stores(out, ref)


def test_too_little_space_for_the_store_is_refused_before_hdf5_writes(
    image_folder, tmp_path, monkeypatch
):
    from collections import namedtuple

    from featcache import store
    from featcache.errors import StoreError

    ref = _extract_tiny(image_folder, tmp_path / "ref.h5").path
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 50_000))
    out = tmp_path / "s.h5"
    with pytest.raises(StoreError, match=r"disk full while writing the store .*needs about"):
        _extract_tiny(image_folder, out)
    assert len(list((tmp_path / "s.h5.parts").glob("*-*.h5"))) == SHARDS  # all kept
    assert not out.exists() and not list(tmp_path.glob(".s.h5.tmp-*"))
    monkeypatch.undo()
    assert _extract_tiny(image_folder, out).resumed_images == 48
    assert_equal_stores(out, ref)

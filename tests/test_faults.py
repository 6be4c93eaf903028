"""Crash safety proven with real processes and real signals (kill -9), a full disk (ENOSPC
injected at the k-th commit, or met on a real filesystem) and readers racing a writer. Fault
hooks live in tinycli.py.

A fresh extraction commits spec.json (1), the temporary store (2) and its layout (3), then a
journal entry per shard (4..), then publishes the store; a resumed one journals only."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINYCLI, assert_equal_stores, make_webdataset, start, tiny_extract

SHARDS = 24  # 36 train + 12 test images in shards of 2
SETUP_COMMITS = 3


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


def _journal(parts):
    return sorted(parts.glob("*.done"))


def _reader_sees_no_store(out):
    for cmd in (("info", out), ("knn", "--store", out, "--k", "1")):
        r = _cli(*cmd)
        assert r.returncode == 1 and "does not exist" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def _stalled(folder, out, stall, mark):
    """An extraction stalled at ``stall`` (tinycli), once it got there."""
    mark.unlink(missing_ok=True)
    p = start(_args(folder, out), FEATCACHE_TEST_STALL=stall, FEATCACHE_TEST_MARK=str(mark))
    _wait_for(lambda: mark.exists() or p.poll() is not None)
    assert mark.exists(), p.communicate()[0]
    return p


def _kill_points(folder, out, parts, rng, n_random, shards):
    """Kill -9 the same extraction again and again at different points; returns how many."""
    kills = 0
    mark = out.with_name("stalled")
    # While the temporary store is made (written, not yet renamed), then at journal commits
    # (a shard's rows written and fsynced, its entry not yet renamed into place).
    for i, stall in enumerate(("commit:2", f"commit:{SETUP_COMMITS + 2}", "commit:2", "commit:1")):
        p = _stalled(folder, out, stall, mark)
        if i == 0:  # a reader started mid-write never sees a store
            _reader_sees_no_store(out)
        _kill(p)
        kills += 1
    # At random moments between batches and writes (a shard takes about 0.4 s here).
    for _ in range(n_random):
        before = len(_journal(parts))
        if before >= shards - 1:
            break  # leave work for the publication kills below (then the count falls short)
        p = start(_args(folder, out), FEATCACHE_TEST_DELAY="0.2")
        _wait_for(lambda p=p, n=before: len(_journal(parts)) > n or p.poll() is not None)
        time.sleep(rng.uniform(0, 0.3))
        _kill(p)
        kills += 1
        assert not out.exists()
    # While publishing, twice: the run's attributes written in place, the rename not done.
    for i in range(2):
        p = _stalled(folder, out, "assemble", mark)
        assert (parts / "store.h5").exists()  # the finished file is still hidden
        if i == 0:
            _reader_sees_no_store(out)
        _kill(p)
        kills += 1
    return kills


def _run_kill_test(dataset, tmp_path, n_random, shards=SHARDS):
    """``dataset``: an image folder or a dataset spec of ``shards`` shards (each random kill
    lands after one or two more, so they must outnumber the kills about twice)."""
    ref = tmp_path / "ref.h5"
    assert subprocess.run(_args(dataset, ref), capture_output=True).returncode == 0
    out = tmp_path / "s.h5"
    parts = tmp_path / "s.h5.parts"
    kills = _kill_points(dataset, out, parts, random.Random(0), n_random, shards)
    assert kills == n_random + 6 and not out.exists()
    final = start(_args(dataset, out))
    log = final.communicate(timeout=120)[0]
    assert final.returncode == 0, log
    assert "resumed from shards" in log
    assert not list(tmp_path.glob(".s.h5.tmp-*")) and not parts.exists()  # nothing left over
    assert_equal_stores(out, ref)


def test_kill_9_at_eight_points_then_resume_equals_uninterrupted(image_folder, tmp_path):
    """On webdataset shards (samples read at their offsets in tar files: they resume as
    files do); image folders are killed in test_extract.py and in the slow test below."""
    spec = f"wds:{make_webdataset(image_folder, tmp_path / 'wds', (('train', 3), ('test', 1)))}"
    _run_kill_test(spec, tmp_path, n_random=2)


@pytest.mark.slow
def test_kill_9_at_many_more_points(tmp_path):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", train=40)  # 132 images: 66 shards
    _run_kill_test(folder, tmp_path, n_random=25, shards=66)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted extraction of a folder, and the folder: what every rerun must equal."""
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("reference")
    folder = make_image_folder(root / "images")
    ref = root / "ref.h5"
    assert subprocess.run(_args(folder, ref), capture_output=True).returncode == 0
    return folder, ref


# The temporary store, a shard's journal entry early, one later, the publication.
@pytest.mark.parametrize("k", [2, SETUP_COMMITS + 2, SETUP_COMMITS + 5, SETUP_COMMITS + SHARDS + 1])
def test_full_disk_is_a_clear_error_and_the_rerun_completes(reference, tmp_path, k):
    image_folder, ref = reference
    out = tmp_path / "s.h5"
    r = subprocess.run(
        _args(image_folder, out),
        env={**os.environ, "FEATCACHE_TEST_ENOSPC": str(k)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "disk full" in r.stderr and "Traceback" not in r.stderr
    parts = tmp_path / "s.h5.parts"
    done = min(max(0, k - SETUP_COMMITS - 1), SHARDS)  # journalled before the failure
    assert len(_journal(parts)) == done
    assert not list(parts.glob("*.tmp*")) and not out.exists()
    r = subprocess.run(_args(image_folder, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{done * 2} resumed from shards" in r.stdout or done == 0
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


def _pages(nbytes: int) -> int:  # tmpfs's pages of 4 KiB
    return -(-nbytes // 4096)


@pytest.mark.parametrize("where", ["store", "journal"])
def test_a_real_full_disk_is_a_clear_error_and_the_rerun_completes(
    reference, tmp_path, small_disk, where
):
    """ENOSPC from the filesystem itself: the store's space is taken when it is made (too
    little: refused before any image is read), so a later full disk meets only a journal
    entry (2 fit, the 3rd does not: the 2 shards are kept)."""
    image_folder, ref = reference
    out = small_disk / "s.h5"
    if where == "store":
        _leave_free(small_disk, _pages(os.path.getsize(ref)) // 2)
        r = subprocess.run(_args(image_folder, out), capture_output=True, text=True, timeout=120)
    else:  # the store is made; the disk fills up before the first batch: 2 entries fit
        hold = tmp_path / "hold"
        hold.touch()
        p = subprocess.Popen(
            _args(image_folder, out),
            env={**os.environ, "FEATCACHE_TEST_HOLD": str(hold)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(lambda: (small_disk / "s.h5.parts" / "layout.json").exists())
        _leave_free(small_disk, 2)
        hold.unlink()
        r = subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate())
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    what = f"store {out}" if where == "store" else f"file {out}.parts/train-000002.done"
    assert f"disk full while writing the {what}" in r.stderr, r.stderr
    parts = small_disk / "s.h5.parts"
    assert len(_journal(parts)) == (0 if where == "store" else 2)
    assert not list(small_disk.rglob("*.tmp*")) and not out.exists()  # no half-written file
    (small_disk / "filler").unlink()  # space freed: the same command finishes the work
    r = subprocess.run(_args(image_folder, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert where == "store" or "4 resumed from shards" in r.stdout
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
    """Where a tmpfs cannot be mounted: the disk fills while the 2nd shard's rows are fsynced
    (where delayed allocation reports it), in process, in the writer thread."""
    from featcache.errors import StoreError
    from featcache.store import writer

    ref = _extract_tiny(image_folder, tmp_path / "ref.h5").path
    fsync, calls = os.fsync, []

    def full_at_second_shard(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("s.h5.parts/store.h5"):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(writer.os, "fsync", full_at_second_shard)
    out = tmp_path / "s.h5"
    with pytest.raises(StoreError, match="disk full while writing the shard train-000001.done"):
        _extract_tiny(image_folder, out)
    parts = tmp_path / "s.h5.parts"
    assert [p.name for p in _journal(parts)] == ["train-000000.done"]
    assert not [p for p in parts.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(writer.os, "fsync", fsync)
    assert _extract_tiny(image_folder, out).resumed_images == 2
    assert_equal_stores(out, ref)


def test_too_little_space_for_the_store_is_refused_before_any_work(
    image_folder, tmp_path, monkeypatch
):
    from collections import namedtuple

    from featcache.errors import StoreError
    from featcache.store import writer

    ref = _extract_tiny(image_folder, tmp_path / "ref.h5").path
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 50_000))
    out = tmp_path / "s.h5"
    with pytest.raises(StoreError, match=r"disk full while writing the store .*needs about"):
        _extract_tiny(image_folder, out)
    assert not _journal(tmp_path / "s.h5.parts") and not out.exists()
    monkeypatch.undo()
    assert _extract_tiny(image_folder, out).images == 48
    assert_equal_stores(out, ref)

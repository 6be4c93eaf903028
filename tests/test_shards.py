"""The writer thread: the same bytes as a synchronous write, bounded memory, errors raised."""

import threading
import time

import pytest
from conftest import assert_equal_stores

from featcache.extraction import shards
from featcache.extraction.extract import ExtractConfig, extract
from featcache.store import ShardedWriter


def _cfg(folder, out, **kw):
    return ExtractConfig(
        backbone="test-tiny", dataset=f"imagefolder:{folder}", out=str(out), workers=0,
        batch_size=3, shard_size=5, progress=False, **kw,
    )  # fmt: skip


def test_the_writer_thread_writes_what_a_synchronous_write_does(
    image_folder, tmp_path, monkeypatch
):
    """With writes slower than batches, so that shards queue up behind the thread; views too
    (their buffers are filled a view at a time)."""
    monkeypatch.setattr(shards, "WRITE_QUEUE", 0)
    sync = extract(_cfg(image_folder, tmp_path / "sync.h5", views=3)).path
    monkeypatch.setattr(shards, "WRITE_QUEUE", 1)
    write = ShardedWriter.write_shard
    in_flight, most, lock = [0], [0], threading.Lock()
    submit = shards.ShardSink.submit

    def counted_submit(self, *args):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        submit(self, *args)

    def slow_write(self, *args):
        time.sleep(0.1)
        write(self, *args)
        with lock:
            in_flight[0] -= 1

    monkeypatch.setattr(shards.ShardSink, "submit", counted_submit)
    monkeypatch.setattr(ShardedWriter, "write_shard", slow_write)
    threaded = extract(_cfg(image_folder, tmp_path / "threaded.h5", views=3)).path
    assert_equal_stores(threaded, sync)
    from featcache.store import Store

    a, b = Store(threaded), Store(sync)
    assert (a.load_views("train", "pooled") == b.load_views("train", "pooled")).all()
    # Shards did queue behind the thread, but never more than one written, one queued and one
    # waiting to be: memory stays bounded.
    assert 2 <= most[0] <= 3


def test_a_failed_write_in_the_thread_is_raised_and_stops_the_writes(
    image_folder, tmp_path, monkeypatch
):
    write, calls = ShardedWriter.write_shard, []

    def failing(self, split, index, *args):
        calls.append(index)
        if len(calls) == 2:
            raise OSError("injected write failure")
        write(self, split, index, *args)

    monkeypatch.setattr(ShardedWriter, "write_shard", failing)
    with pytest.raises(OSError, match="injected write failure"):
        extract(_cfg(image_folder, tmp_path / "s.h5"))
    journal = sorted(p.name for p in (tmp_path / "s.h5.parts").glob("*.done"))
    assert journal == ["train-000000.done"]  # nothing after the failure was written
    monkeypatch.undo()
    assert extract(_cfg(image_folder, tmp_path / "s.h5")).resumed_images == 5

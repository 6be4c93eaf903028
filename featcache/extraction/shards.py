"""Finished shards leave the device and reach the disk while the device works on.

A shard's features are gathered on the device (``ShardSink.buffers``); when its last batch is
in, ``submit`` makes one device-to-host copy per array on a side stream into pinned memory
and hands the shard to a writer thread, which waits for the copy's event and writes and
fsyncs the rows. The device never waits for the disk, the disk never for the device, and no
batch synchronises with the host. Memory stays bounded: at most ``depth + 1`` shards are
between the device and the disk (two pinned sets on a GPU), and ``submit`` blocks when the
disk falls behind. The bytes written are those of a synchronous write (``depth=0``: the
calling thread writes, as tests compare).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from featcache.store import ShardedWriter

# Shards waiting for the writer thread (beyond the one it writes); 0 writes synchronously.
WRITE_QUEUE = 1


@dataclass
class Shard:
    """One shard of a split being extracted: ``rows`` of the split, in order."""

    split: str
    index: int
    rows: range
    arrays: tuple[str, ...] = ()  # paths of its per-sample arrays (features/..., views/...)
    skipped: list = None  # (row, id) of unreadable images, whose rows stay zero
    seconds: float = 0.0


class ShardSink:
    def __init__(
        self, writer: ShardedWriter, device: torch.device, max_rows: int, depth: int | None = None
    ):
        self.writer, self.device, self.max_rows = writer, device, max_rows
        self.depth = WRITE_QUEUE if depth is None else depth
        self.error: BaseException | None = None
        self._failed = False  # once a write failed, nothing more is written
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        self._pinned: queue.Queue = queue.Queue()  # free sets of pinned host buffers
        self._pinned_sets = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.depth))
        self._thread = None
        if self.depth:
            self._thread = threading.Thread(target=self._drain, name="featcache-writer")
            self._thread.daemon = True
            self._thread.start()

    def buffers(self, rows: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Zeroed float32 arrays on the device for a shard's features, by path."""
        return {k: torch.zeros((rows, *s), device=self.device) for k, s in shapes.items()}

    def submit(self, shard: Shard, ids: list[str], labels: np.ndarray, arrays: dict) -> None:
        """Queue a finished shard; its device arrays must not be written to again."""
        self._raise()
        n = len(ids)
        if self._cuda:  # one copy per array, on the side stream, into pinned memory
            host = self._pinned_set(arrays)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for k, t in arrays.items():
                    host[k][:n].copy_(t, non_blocking=True)
                    t.record_stream(self._stream)  # not reused before the copy is done
                event = torch.cuda.Event(blocking=True)  # the writer thread sleeps on it
                event.record(self._stream)
        else:
            host, event = arrays, None
        item = (shard, ids, labels, host, event, n)
        if self._thread is None:
            self._write(*item)
        else:
            self._queue.put(item)  # blocks while the disk is behind: memory stays bounded

    def _pinned_set(self, arrays: dict) -> dict[str, torch.Tensor]:
        """A free set of pinned host buffers (at most ``depth + 1`` are ever made), with one
        buffer of ``max_rows`` rows for every array of this shard."""
        if self._pinned.empty() and self._pinned_sets < self.depth + 1:
            self._pinned_sets += 1
            host = {}
        else:
            host = self._pinned.get()  # waits for the writer to release one
            self._raise()
        for k, t in arrays.items():
            if k not in host:  # views exist in train shards only
                host[k] = torch.empty((self.max_rows, *t.shape[1:]), pin_memory=True)
        return host

    def _write(self, shard: Shard, ids, labels, host, event, n: int) -> None:
        if event is not None:
            event.synchronize()
        arrays = {k: v[:n].numpy() for k, v in host.items() if k in shard.arrays}
        self.writer.write_shard(
            shard.split, shard.index, shard.rows.start, ids, labels, arrays, shard.skipped or [],
            shard.seconds,
        )  # fmt: skip
        if event is not None:
            self._pinned.put(host)

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if not self._failed:  # after an error, queued shards are dropped, not written
                try:
                    self._write(*item)
                except BaseException as exc:  # raised in the main thread by the next call
                    self.error, self._failed = exc, True
                    self._pinned.put(item[3])  # a submit waiting for pinned memory wakes

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        """Write what is queued, stop the thread, and raise its error, if any."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise()

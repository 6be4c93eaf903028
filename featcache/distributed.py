"""This process's place under torchrun, for the stages that split their work across ranks.

Extraction gives each rank every world-th shard (the store equals a single-process one);
k-NN gives each rank a share of the queries and the probe a share of its weight-decay sweep,
and every rank then gathers the others' parts, so each computes the one-process result.
Without torchrun a process is rank 0 of 1 and nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def writes_results() -> bool:
    """Whether this process writes and prints results: rank 0 under torchrun (whose ranks all
    hold the same result), any process without it."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Distributed:
    """Rank and world size (0 of 1 without torchrun), and the few collectives the stages use."""

    rank: int = 0
    world: int = 1
    # Launched by torchrun: a process group exists, also for a single process (whose run
    # then takes the same path as one rank of many: nccl bound to its GPU, barriers).
    launched: bool = False

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> Distributed:
        """Join torchrun's process group: the one that exists (a caller's, or an earlier
        stage's in this process), else a new one, nccl bound to ``device`` when it is a GPU
        (``device.rank_device``), else gloo.

        A group made here lives until the process exits: stages that run one after another
        in one script (extract, then knn, then probe) share it, where destroying and making
        it again can leave ranks waiting for each other.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            timeout = datetime.timedelta(hours=24)
            if device is not None and device.type == "cuda":
                td.init_process_group("nccl", timeout=timeout, device_id=device)
            else:
                td.init_process_group("gloo", timeout=timeout)
            # nccl warns at exit about a group left behind; destroying it before then is
            # local to this process.
            atexit.register(td.destroy_process_group)
        return cls(td.get_rank(), td.get_world_size(), launched=True)

    def barrier(self) -> None:
        if self.launched:
            import torch.distributed as td

            td.barrier()

    def owns(self, shard: int) -> bool:
        """Whether shard ``shard`` is this rank's (every world-th one)."""
        return shard % self.world == self.rank

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items; the shares of all ranks, in rank
        order, are ``0..n`` (sizes differ by at most one)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.launched:
            return [obj]
        import torch.distributed as td

        parts = [None] * self.world
        td.all_gather_object(parts, obj)
        return parts

"""An evaluation split over the processes of a launch (``torchrun`` / ``accelerate launch``).

Each process runs the model on one contiguous block of whole batches of every set, so every
batch is exactly the batch one process would run; the main process gathers the blocks in rank
order (= dataset order) and alone postprocesses, computes metrics and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's ``rank`` among ``world`` evaluating processes (one: no communication)."""

    rank: int = 0
    world: int = 1
    group: Any = None   # a gloo group for Python objects (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def span(self, n: int, batch_size: int) -> range:
        """The samples of an ``n``-sample set this process runs: a block of whole batches."""
        batches = -(-n // batch_size)
        lo, hi = batches * self.rank // self.world, batches * (self.rank + 1) // self.world
        return range(min(lo * batch_size, n), min(hi * batch_size, n))

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` in rank order on the main process (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


SINGLE = Processes()


def launched_processes(device: torch.device | str) -> Processes:
    """The processes of this launch: ``WORLD_SIZE`` > 1 joins (or reuses) the process group, gloo on
    CPU and NCCL on CUDA (then Python objects travel through a gloo group)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), group)


def process_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this process's GPU (``LOCAL_RANK``) in a multi-process launch."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device

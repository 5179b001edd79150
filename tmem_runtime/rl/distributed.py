"""torch.distributed for RL: one process per device, the same code on one CPU and on many GPUs.

Under `torchrun` (WORLD_SIZE, RANK, LOCAL_RANK in the environment) `init_distributed` joins the
process group: NCCL when the run is on CUDA, gloo on the CPU. Without it the run is one process and
no group is made (every collective below is then the identity). The policy is wrapped in
DistributedDataParallel (trainer.py), so gradients are averaged across ranks by DDP itself; this
module only carries the small things DDP does not: which rollouts are whose, and the rewards and
counters every rank needs to normalise groups that span ranks and to log the whole batch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """rank, world size and the device of this process; `group` is True when a process group is in use."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous block of `items` (blocks differ in size by at most one)."""
        n = len(items)
        return list(items[self.rank * n // self.world : (self.rank + 1) * n // self.world])

    def all_gather_objects(self, obj: object) -> list:
        """Every rank's `obj`, in rank order (picklable objects)."""
        if not self.group:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max of a few floats over every rank (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.group:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def barrier(self) -> None:
        if self.group:
            dist.barrier()


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Join torchrun's process group when there is one (NCCL on CUDA, gloo on the CPU), else one process.

    device: "auto" (CUDA when available), "cpu" or "cuda". Each rank takes CUDA device LOCAL_RANK.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistContext(0, 1, torch.device("cuda" if use_cuda else "cpu"), False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, True)


def close_distributed(ctx: DistContext) -> None:
    if ctx.group and dist.is_initialized():
        dist.barrier()  # every rank done (rank 0 plots last) before any tears its group down
        dist.destroy_process_group()

"""torch.distributed set-up for `torchrun`: gloo on CPU, nccl on GPU. A plain `python` run is one rank."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device_kind: str) -> DistContext:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def step_totals(ctx: DistContext, count: int, flag: bool, device: torch.device) -> tuple[int, int, bool]:
    """Over ranks: the sum and the minimum of this step's episode count, and whether any rank raised `flag`
    (a stop request, so that every rank stops after the same step)."""
    if not ctx.active:
        return count, count, flag
    summed = torch.tensor([count, int(flag)], dtype=torch.long, device=device)
    smallest = torch.tensor([count], dtype=torch.long, device=device)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(summed[0]), int(smallest[0]), bool(summed[1])

"""Everything that knows about ranks: torchrun's environment, process groups, DDP, rank-0 helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """This process's place as torchrun describes it in RANK/WORLD_SIZE; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))


def init_distributed(info: DistInfo, backend: str, device: torch.device) -> None:
    """Join the process group; NCCL only carries CUDA tensors, so a CPU run takes gloo whatever was asked."""
    if not info.enabled:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)


def teardown(info: DistInfo, finished: bool) -> None:
    """Leave the process group. After a clean finish, first wait for every rank (rank 0 may still be
    saving); after an error, leave at once, so the error surfaces and torchrun stops the other ranks."""
    if info.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def apply_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap for data parallelism; DDP broadcasts rank 0's weights so every rank starts identical."""
    if not info.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)  # SUM then divide: gloo has no AVG
        value /= info.world_size
    return value


def print0(info: DistInfo, *args, **kwargs) -> None:
    if info.is_main:
        print(*args, **kwargs, flush=True)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank (e.g. RNG states for the checkpoint)."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered

"""Distributed set-up in one place: torchrun's environment -> process group and device.

Launched with `torchrun --nproc_per_node=N`, the process group uses NCCL on GPUs and gloo on CPU;
launched plainly, everything runs in one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, device=device)


def wait_for_all(info: Distributed) -> None:
    """Return once every process has called this: ranks that finished their work wait for the
    others (rank 0 exports) before the process group goes, as a gloo rank that destroys its group
    while another still works can abort at exit ("terminate called without an active exception")."""
    if info.enabled:
        dist.barrier()


def teardown(info: Distributed) -> None:
    if info.enabled:
        dist.destroy_process_group()


def mean_across(value: torch.Tensor, info: Distributed) -> float:
    """The mean of a scalar tensor over all processes."""
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value.item()

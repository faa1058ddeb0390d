"""torch.distributed set-up from the launcher's environment (torchrun, or submitit's task environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return default


def setup(device: str | None = None) -> DistEnv:
    """Initialise the process group when launched with several processes (NCCL on GPU, gloo on CPU)."""
    world = _env_int("WORLD_SIZE", default=1)
    rank = _env_int("RANK", default=0)
    local = _env_int("LOCAL_RANK", default=0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, dev)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_available() and torch_dist.is_initialized():
        t = t.clone()
        torch_dist.all_reduce(t)
        t /= torch_dist.get_world_size()
    return t


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()

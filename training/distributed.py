"""torchrun integration: process group from the environment, DDP or FSDP wrapping.

DDP runs with find_unused_parameters because layer dropout can skip a layer for the
whole local batch. FSDP (torch's fully_shard) shards every decoder layer plus the root;
since each layer then all-gathers its parameters when called, LayerSkipLM calls every
layer on every rank (on one zero-weighted row if all local samples dropped it)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device available")
    if world <= 1:
        return DistEnv(device=torch.device(device))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    dev = torch.device(device, local) if device == "cuda" else torch.device("cpu")
    return DistEnv(rank=dist.get_rank(), world_size=world, device=dev)


def wrap(module: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    """module is a LayerSkipLM; returns what the training loop calls."""
    if not env.enabled:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in module.model.model.layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, find_unused_parameters=True)


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_mean(value: float, env: DistEnv) -> float:
    """Mean of `value` over ranks. The tensor lives on env.device: NCCL reduces only
    CUDA tensors (gloo takes CPU ones, and env.device is the CPU there)."""
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.item() / env.world_size


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()

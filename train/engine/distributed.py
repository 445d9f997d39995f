"""torchrun / torch.distributed set-up shared by every training command: the process's place, the
process group, DDP wrapping, and model + optimizer state gathered in full (valid for any world size)."""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.nn as nn




@dataclasses.dataclass
class DistInfo:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """torchrun environment → process group (NCCL on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown_distributed() -> None:
    """Destroy the process group if one was made (safe to call always)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def ddp_wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel without find_unused_parameters, on this process's device."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are their own root)."""
    return model.module if hasattr(model, "module") else model

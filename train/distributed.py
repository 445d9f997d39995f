"""torchrun / torch.distributed set-up shared by every training command: the process's place, the
process group, DDP wrapping, and model + optimizer state gathered in full (valid for any world size)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn

from mae_fast.kernels import backend_choices, restore_backend_choices

from .checkpoints import rng_state


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


def gather_rng_states(info: DistInfo) -> Any:
    """This process's RNG states, or (under torchrun) every rank's as a list indexed by rank."""
    states: Any = rng_state()
    if info.enabled:
        gathered: List[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, states)
        states = gathered
    return states


def agree_kernel_choices(info: DistInfo) -> None:
    """Every rank adopts rank 0's timed kernel choices (``mae_fast.kernels.backend_choices``). Each rank
    times an op at its own first step, so ranks could otherwise compute with different implementations
    (rounding differs) and a resumed run, which adopts rank 0's from the checkpoint, would not continue
    exactly. All ranks call it at the same point (after the first step, at every save)."""
    if not info.enabled:
        return
    box = [backend_choices() if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    if not info.is_main:
        restore_backend_choices(box[0])


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> Dict[str, Any]:
    """Model (official keys) and optimizer state gathered in full, valid for any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {"model": {k.removeprefix("module."): v for k, v in model_sd.items()}, "optimizer": optim_sd}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Inverse of :func:`full_state` on every rank (each loads the full state, keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=opts)


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite, read with one host sync."""
    flags = [torch.isfinite(p).all() for p in unwrap(model).parameters()]
    return bool(torch.stack([f.full_tensor() if hasattr(f, "full_tensor") else f for f in flags]).all())

"""torchrun / torch.distributed set-up shared by every training command: the process's place, the
process group, and wrapping the model for it (DDP, or FSDP2 per block)."""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from mae_fast.device import DistInfo


def init_distributed(device_type: str) -> DistInfo:
    """torchrun environment → process group (NCCL on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown_distributed(finished: bool = False) -> None:
    """Destroy the process group if one was made (safe to call always). ``finished``: every rank ended its run,
    so first free the run's modules (FSDP2 keeps them in reference cycles; left to the interpreter's exit, their
    teardown after the group's aborted a rank about once in 25 two-process runs: "terminate called without an
    active exception"), then wait at a barrier until every rank has, so that no rank tears its group down while
    another still has a collective in flight; never after an error, where a rank that failed would leave the
    others waiting."""
    if dist.is_initialized():
        if finished:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def ddp_wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel without find_unused_parameters, on this process's device."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def wrap_model(model: nn.Module, mode: str, info: DistInfo, device: torch.device) -> nn.Module:
    """Under torchrun: DDP (``mode`` "ddp"), or FSDP2 ``fully_shard`` per block of ``model.blocks`` and
    ``model.decoder_blocks`` then the root ("fsdp"); the model itself in a single process."""
    if not info.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in [*model.blocks, *model.decoder_blocks]:
            fully_shard(blk)
        return fully_shard(model)
    return ddp_wrap(model, device)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are their own root)."""
    return model.module if hasattr(model, "module") else model

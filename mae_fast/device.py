"""One device resolver and autocast policy for every command (training, benchmarks, tools)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import ContextManager

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


@dataclasses.dataclass
class DistInfo:
    """This process's place under torchrun (rank 0 of 1 without it): which device it takes, what it saves."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Rank 0 of the process group, or of torchrun's ``RANK`` before the group exists; True in one process: the
    process that logs what every rank would log alike."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


def requested_device_type(requested: str) -> str:
    """"cuda" or "cpu" as ``--device`` asks (auto: cuda when visible), before any process group exists."""
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f"--device must be one of {list(DEVICE_CHOICES)}, got {requested!r}")
    return "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """CPU, or this process's local GPU (``requested``: auto | cpu | cuda); DeviceError if cuda is absent."""
    if requested_device_type(requested) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA device is visible (use --device auto or cpu)")
    if local_rank >= torch.cuda.device_count():
        raise DeviceError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (bf16 / fp16), or None for fp32 / fp64 (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype attention and the GEMMs run in under ``precision``: autocast's (bf16 / fp16), else the
    parameters' own (fp32 / fp64). What ``--attn-backend auto`` must time its candidates in: flash
    attention, say, runs in bf16 but not in fp32."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {list(PRECISION_DTYPES)}, got {precision!r}")
    return PRECISION_DTYPES[precision]


def autocast_for(precision: str, device: torch.device) -> ContextManager:
    """bf16/fp16 autocast per ``precision``; a null context for fp32/fp64."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Pieces shared by the training loops (mae-pretrain, mae-finetune, mae-linprobe): torchrun setup,
device and autocast, DDP wrapping, full (world-size independent) state for checkpoints, CSV/TensorBoard logs."""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoints import rng_state

log = logging.getLogger("mae_fast.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


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


def resolve_device(cfg: Any, info: DistInfo) -> torch.device:
    """CPU, or the process's local GPU (``cfg.device``: auto | cpu | cuda)."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible (use --device auto or cpu)")
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)


def requested_device_type(cfg: Any) -> str:
    """"cuda" or "cpu" as ``cfg.device`` asks (before any process group exists)."""
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"


def ddp_wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel without find_unused_parameters, on this process's device."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather_rng_states(info: DistInfo) -> Any:
    """This process's RNG states, or (under torchrun) every rank's as a list indexed by rank."""
    states: Any = rng_state()
    if info.enabled:
        gathered: List[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, states)
        states = gathered
    return states


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 modules are their own root)."""
    return model.module if hasattr(model, "module") else model


def full_state(model, optimizer, info: DistInfo) -> Dict[str, Any]:
    """Model (official keys) and optimizer state gathered in full, valid for any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {"model": {k.removeprefix("module."): v for k, v in model_sd.items()}, "optimizer": optim_sd}


def load_full_state(model, optimizer, state: Dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=opts)


def autocast_for(cfg: Any, device: torch.device):
    """bf16/fp16 autocast per ``cfg.precision``; a null context for fp32/fp64."""
    if cfg.precision in ("fp32", "fp64"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def all_finite(model) -> bool:
    """Whether every parameter is finite, read with one host sync."""
    flags = [torch.isfinite(p).all() for p in unwrap(model).parameters()]
    return bool(torch.stack([f.full_tensor() if hasattr(f, "full_tensor") else f for f in flags]).all())


class RunLog:
    """CSV + TensorBoard scalars on the main process."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.folder = enabled, Path(folder)
        self.writer = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        new = not (folder / "log.csv").exists()
        self.csv_file = open(folder / "log.csv", "a", newline="")
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["step", "epoch", "loss", "lr", "images_per_s"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: CSV log only")

    def write(self, step: int, epoch: float, loss: float, lr: float, ips: float) -> None:
        if not self.enabled:
            return
        self.csv.writerow([step, f"{epoch:.4f}", f"{loss:.6f}", f"{lr:.6e}", f"{ips:.1f}"])
        self.csv_file.flush()
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/images_per_s", ips, step)

    def write_eval(self, step: int, epoch: float, metrics: Dict[str, float]) -> None:
        """One row of ``eval.csv`` (step, epoch, then ``metrics`` in order) and TensorBoard eval/* scalars."""
        if not self.enabled:
            return
        path = self.folder / "eval.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "epoch", *metrics])
            w.writerow([step, f"{epoch:.4f}", *(f"{v:.6f}" for v in metrics.values())])
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.csv_file.close()
            if self.writer:
                self.writer.close()




_FLAG_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "Optional[float]": float, "Optional[int]": int}


def dataclass_parser(cls: type, prog: str, description: str,
                     choices: Optional[Dict[str, List[Any]]] = None) -> argparse.ArgumentParser:
    """A flag per field of the config dataclass ``cls`` (``--img-size``; booleans also as ``--no-...``)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, type) else _FLAG_TYPES[str(f.type)]
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=kind, default=None, choices=(choices or {}).get(f.name),
                           help=help_)
    return p


def parse_dataclass(cls: type, parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> Any:
    """``cls`` with the defaults overridden by the flags given."""
    args = parser.parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if getattr(args, f.name) is not None})

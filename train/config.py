"""Pretraining options: the official recipe as defaults, presets, YAML files and command-line flags.

Precedence: defaults < ``--preset`` < ``--config`` YAML < flags given on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from mae_fast.models_mae import MODELS

from .common import dataclass_parser


@dataclass
class PretrainConfig:
    """Every option of ``mae-pretrain``; the help text of each flag is its metadata."""

    model: str = dataclasses.field(default="mae_vit_large_patch16", metadata={"help": "model factory name"})
    img_size: int = dataclasses.field(default=224, metadata={"help": "input resolution (multiple of the patch)"})
    data: str = dataclasses.field(default="demo", metadata={"help": "image folder, ImageFolder tree, list file, or 'demo'"})
    loader: str = dataclasses.field(default="auto", metadata={"help": "auto | dali | pil | synthetic"})
    num_workers: int = dataclasses.field(default=8, metadata={"help": "PIL loader workers / DALI threads"})
    strict_data: bool = dataclasses.field(default=False, metadata={"help": "stop at the first unreadable image instead of skipping it"})
    output_dir: str = dataclasses.field(default="runs/mae", metadata={"help": "checkpoints, logs and figures go here"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "images per process per micro-step"})
    accum_iter: int = dataclasses.field(default=1, metadata={"help": "micro-steps per optimizer step (gradient accumulation)"})
    epochs: int = dataclasses.field(default=800, metadata={"help": "training epochs"})
    warmup_epochs: float = dataclasses.field(default=40.0, metadata={"help": "linear lr warmup, in epochs (set per iteration)"})
    blr: float = dataclasses.field(default=1.5e-4, metadata={"help": "base lr: lr = blr * effective batch / 256"})
    lr: Optional[float] = dataclasses.field(default=None, metadata={"help": "absolute lr (overrides --blr)"})
    min_lr: float = dataclasses.field(default=0.0, metadata={"help": "lr at the end of the cosine"})
    weight_decay: float = dataclasses.field(default=0.05, metadata={"help": "AdamW weight decay (not on norms and biases)"})
    mask_ratio: float = dataclasses.field(default=0.75, metadata={"help": "fraction of patches removed"})
    norm_pix_loss: bool = dataclasses.field(default=True, metadata={"help": "per-patch normalized pixel target"})
    precision: str = dataclasses.field(default="bf16", metadata={"help": "bf16 (autocast, no scaler) | fp16 (autocast + GradScaler) | fp32 | fp64 (float64 weights, for exactness checks on CPU)"})
    attn_backend: str = dataclasses.field(default="auto", metadata={"help": "auto (fastest that works here) | xformers | sdpa | math"})
    kernel_backend: str = dataclasses.field(default="auto", metadata={"help": "auto (Triton on CUDA after a self-test) | triton | torch"})
    grad_checkpointing: int = dataclasses.field(default=0, metadata={"help": "recompute every k-th block in backward (0: off)"})
    distributed: str = dataclasses.field(default="ddp", metadata={"help": "ddp | fsdp (FSDP2 fully_shard), used under torchrun"})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto | cpu | cuda"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of data order, crops and masks"})
    save_every: int = dataclasses.field(default=1000, metadata={"help": "checkpoint every N optimizer steps (and at the end)"})
    keep_checkpoints: int = dataclasses.field(default=3, metadata={"help": "keep the newest k checkpoints"})
    resume: str = dataclasses.field(default="", metadata={"help": "'auto' (newest complete checkpoint in output-dir), a file, or '' (fresh)"})
    init_from: str = dataclasses.field(default="", metadata={"help": "start from these weights (official or mae-fast checkpoint)"})
    log_every: int = dataclasses.field(default=20, metadata={"help": "log loss, lr and images/s every N steps"})
    max_steps: int = dataclasses.field(default=0, metadata={"help": "stop after this many optimizer steps (0: run all epochs)"})
    skip_nonfinite: int = dataclasses.field(default=0, metadata={"help": "skip up to K steps with a NaN/inf loss instead of stopping"})
    tensorboard: bool = dataclasses.field(default=True, metadata={"help": "write TensorBoard logs when tensorboard is installed"})
    progress: bool = dataclasses.field(default=True, metadata={"help": "show a tqdm progress bar"})
    visualize: bool = dataclasses.field(default=False, metadata={"help": "write a reconstruction figure at the end"})

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_iter


PRESETS: Dict[str, Dict[str, Any]] = {
    "demo": dict(model="mae_vit_tiny_patch8", img_size=64, data="demo", loader="pil", num_workers=0,
                 output_dir="runs/demo", batch_size=8, epochs=150, warmup_epochs=5, lr=2e-3,
                 precision="fp32", save_every=100, log_every=10, visualize=True),
    "vit_b16_224": dict(model="mae_vit_base_patch16", img_size=224, batch_size=64, epochs=1600),
    "vit_l16_224": dict(model="mae_vit_large_patch16", img_size=224, batch_size=64, epochs=1600),
    "vit_h14_224": dict(model="mae_vit_huge_patch14", img_size=224, batch_size=64, epochs=1600),
    "vit_h14_448": dict(model="mae_vit_huge_patch14", img_size=448, batch_size=32, epochs=1600,
                        grad_checkpointing=1, precision="bf16", distributed="fsdp"),
}

CHOICES = {"model": sorted(MODELS), "attn_backend": ["auto", "xformers", "sdpa", "math"],
           "kernel_backend": ["auto", "triton", "torch"], "loader": ["auto", "dali", "pil", "synthetic"],
           "precision": ["bf16", "fp16", "fp32", "fp64"], "distributed": ["ddp", "fsdp"], "device": ["auto", "cpu", "cuda"]}


def build_parser() -> argparse.ArgumentParser:
    """Flags for every config field (``--img-size``; booleans also as ``--no-...``), plus presets."""
    p = dataclass_parser(PretrainConfig, "mae-pretrain",
                         "MAE pretraining with the official recipe as defaults. Start with `mae-pretrain --demo` "
                         "(tiny model, bundled images, CPU, a minute or two).", CHOICES)
    p.add_argument("--demo", action="store_true", help="tiny model on the bundled demo images; writes a reconstruction figure")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the paper's runs (ViT-B/L/H at 224, ViT-H/14 at 448)")
    p.add_argument("--config", help="YAML file with options (keys as the flag names, '-' or '_')")
    return p


def load_yaml(path: str) -> Dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {path}: no such file")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of options, got {type(data).__name__}")
    known = {f.name for f in fields(PretrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"config file {path}: unknown option {key!r}")
        out[name] = value
    return out


def parse_config(argv: Optional[List[str]] = None) -> PretrainConfig:
    """Merge defaults, preset, YAML and flags into a validated PretrainConfig."""
    args = build_parser().parse_args(argv)
    values: Dict[str, Any] = {}
    preset = "demo" if args.demo else args.preset
    if preset:
        values.update(PRESETS[preset])
    if args.config:
        values.update(load_yaml(args.config))
    values.update({f.name: getattr(args, f.name) for f in fields(PretrainConfig) if getattr(args, f.name) is not None})
    cfg = PretrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    for name in ("batch_size", "accum_iter", "epochs", "save_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")

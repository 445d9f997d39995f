"""Pretraining options: the official recipe as defaults, presets, YAML files and command-line flags.

Precedence: defaults < ``--preset`` < ``--config`` YAML < flags given on the command line.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

from mae_fast.attention import ATTENTION_BACKENDS, BACKEND_NAMES
from mae_fast.compile import COMPILE_MODES
from mae_fast.device import DEVICE_CHOICES, PRECISION_DTYPES
from mae_fast.errors import ConfigError
from mae_fast.kernels import KERNEL_BACKENDS
from mae_fast.models_mae import ACTIVATION_DTYPES, INPUT_POSITIONS, MODEL_CONFIGS, MODELS
from mae_fast.resolution import GROW_BATCH, ResolutionSchedule, from_options

from ..data.loader_base import default_workers
from ..data.loaders import KINDS as LOADER_KINDS
from .cli import add_config_flags, add_print_config_flag, dataclass_parser, opt, print_config
from .cli import parse_config as parse_dataclass_config


@dataclass
class PretrainConfig:
    """Every option of ``mae-pretrain``; the help text and allowed range of each flag is its metadata."""

    model: str = opt("model factory name", "mae_vit_large_patch16", choices=sorted(MODELS))
    img_size: int = opt("input resolution (multiple of the patch); with --grow-from, the final one", 224, min=1)
    grow_from: int = opt("progressive resolution: the first epoch's image side, growing linearly to --img-size over "
                         "--grow-epochs, then --img-size to the end (0: --img-size throughout, the paper's setting)",
                         0, min=0)
    grow_epochs: Optional[int] = opt("epochs over which the side grows (default: 60%% of --epochs)", None, min=0)
    grow_step: int = opt("sizes in between are multiples of this many px (0: two patches); each size is compiled "
                         "once", 0, min=0)
    grow_batch: str = opt("fixed (the same batch and lr at every size) | tokens (batch and lr x floor(L_final / L) "
                          "at a size of L patches: about the final size's tokens per batch)", "fixed",
                          choices=list(GROW_BATCH))
    grow_positions: str = opt("position tables below --img-size: official (the official code's for that grid: patch "
                              "index k has one code at every size) | scaled (each patch's centre in the final grid: a "
                              "code stays tied to a place in the image; learned more in our digits check)", "official",
                              choices=list(INPUT_POSITIONS))
    data: str = opt("image folder, ImageFolder tree, list file, tar shards (a .tar file, a brace pattern, a "
                    "folder of .tar files or a list file of them), or 'demo'", "demo")
    loader: str = opt("auto (DALI on CUDA when installed, else nvjpeg on CUDA when torchvision decodes JPEG there "
                      "and --data is no tar shards, else PIL) | dali | nvjpeg "
                      "(torchvision GPU JPEG decode) | pil | synthetic", "auto", choices=list(LOADER_KINDS))
    num_workers: int = opt("PIL loader workers / DALI threads / nvjpeg file-reading threads (default: the cores "
                           "available, at most 8)",
                           default_workers(), min=0)
    strict_data: bool = opt("stop at the first unreadable image instead of skipping it", False)
    output_dir: str = opt("checkpoints, logs and figures go here (default: a new runs/<preset or mae>[-N])", "")
    overwrite: bool = opt("replace the run already in --output-dir (its checkpoints and logs are deleted)", False)
    batch_size: int = opt("images per process per micro-step; auto: the largest that fits the device's memory "
                          "(or --memory-budget) with 10%% headroom, predicted by tracing the step", 64, min=1, auto=True)
    accum_iter: int = opt("micro-steps per optimizer step (gradient accumulation)", 1, min=1)
    epochs: int = opt("training epochs", 800, min=1)
    warmup_epochs: float = opt("linear lr warmup, in epochs (set per iteration)", 40.0, min=0)
    blr: float = opt("base lr: lr = blr * effective batch / 256", 1.5e-4, above=0)
    lr: Optional[float] = opt("absolute lr (overrides --blr)", None, above=0)
    min_lr: float = opt("lr at the end of the cosine", 0.0, min=0)
    weight_decay: float = opt("AdamW weight decay (not on norms and biases)", 0.05, min=0)
    mask_ratio: float = opt("fraction of patches removed", 0.75, above=0, below=1)
    min_crop_scale: float = opt("smallest area fraction of RandomResizedCrop (the recipe's 0.2)", 0.2, above=0, max=1)
    norm_pix_loss: bool = opt("per-patch normalized pixel target", True)
    precision: str = opt("bf16 (autocast) | fp16 (autocast, dynamic loss scaling) | fp32 | fp64 (float64 weights "
                         "and images, for exactness checks on CPU); a GradScaler steps the optimizer in every "
                         "precision: outside fp16 its scale stays 1 and it only skips an update whose gradients "
                         "are not finite", "bf16", choices=list(PRECISION_DTYPES))
    compile: str = opt("torch.compile: auto (per-block on CUDA, off on CPU) | off | blocks | model", "auto",
                       choices=COMPILE_MODES)
    attn_backend: str = opt("auto (timed per site at the real shapes on CUDA; sdpa on CPU) | "
                            + " | ".join(ATTENTION_BACKENDS),
                            "auto", choices=list(BACKEND_NAMES))
    activation_dtype: str = opt("residual stream between blocks: fp32 (exact to the official code) | bf16 (less "
                                "memory and traffic, under bf16 autocast)", "fp32", choices=list(ACTIVATION_DTYPES))
    kernel_backend: str = opt("auto (Triton on CUDA after a self-test) | triton | torch", "auto",
                              choices=list(KERNEL_BACKENDS))
    grad_checkpointing: int = opt("recompute every k-th block in backward (0: off); auto: the least that fits "
                                  "(after --batch-size auto)", 0, min=0, auto=True)
    memory_budget: Optional[float] = opt("GiB a step may use, for --batch-size / --grad-checkpointing auto "
                                         "(default: the GPU's memory)", None, above=0)
    distributed: str = opt("ddp | fsdp (FSDP2 fully_shard), used under torchrun", "ddp", choices=["ddp", "fsdp"])
    device: str = opt(" | ".join(DEVICE_CHOICES) + " (auto: cuda when visible)", "auto", choices=list(DEVICE_CHOICES))
    seed: int = opt("seed of the initial weights, data order, crops and masks", 0, min=0)
    checkpoint_format: str = opt("full (one file gathered on rank 0) | sharded (a torch.distributed.checkpoint "
                                 "folder, each rank writes its shard: FSDP2 at scale)", "full",
                                 choices=["full", "sharded"])
    data_streams: int = opt("tar shards: data streams (0: one per process); a fixed N that every world size "
                            "divides gives the same batches on any number of processes", 0, min=0)
    shuffle_block: int = opt("tar shards: samples shuffled together within a shard", 1000, min=1)
    save_every: int = opt("checkpoint every N optimizer steps (and at the end)", 1000, min=1)
    keep_checkpoints: int = opt("keep the newest k checkpoints (0: keep all)", 3, min=0)
    resume: str = opt("'auto' (newest complete checkpoint in the output folder), a file, or '' (fresh)", "")
    init_from: str = opt("start from these weights (official or mae-fast checkpoint)", "")
    log_every: int = opt("log loss, lr and images/s every N steps", 20, min=1)
    max_steps: int = opt("stop after this many optimizer steps (0: run all epochs)", 0, min=0)
    skip_nonfinite: int = opt("skip up to K steps with a NaN/inf loss instead of stopping", 0, min=0)
    tensorboard: bool = opt("write TensorBoard logs when tensorboard is installed", True)
    progress: bool = opt("show a tqdm progress bar on a terminal (else one line per --log-every steps)", True)
    visualize: bool = opt("write a reconstruction figure of a bundled image at the end (with --data demo only)",
                          False)
    knn_data: str = opt("ImageFolder tree with train/ and val/: log the encoder's weighted k-NN top-1/top-5 on it "
                        "every --knn-every epochs and at the end ('': off)", "")
    knn_every: int = opt("k-NN monitor: every N epochs", 1, min=1)
    knn_k: int = opt("k-NN monitor: neighbours that vote", 20, min=1)
    knn_temperature: float = opt("k-NN monitor: vote weight exp(cosine / T)", 0.07, above=0)
    knn_pool: str = opt("k-NN monitor features after the final norm: cls (cls token) | avg (mean of the patch tokens)",
                        "cls", choices=["cls", "avg"])

    preset: ClassVar[Optional[str]] = None  # the --preset / --demo used (names the default run folder)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_iter

    def schedule(self) -> ResolutionSchedule:
        """The image side (and batch rule) of every epoch: ``--img-size`` throughout unless ``--grow-from``."""
        return from_options(self.img_size, self.grow_from, self.grow_epochs, self.epochs,
                            MODEL_CONFIGS[self.model]["patch_size"], self.grow_step, self.grow_batch)


PRESETS: Dict[str, Dict[str, Any]] = {
    # the paper's figures show reconstructions of a model trained without norm-pix loss: the demo does the same,
    # on whole images (no crop): 3200 steps on the 19 photos (~100 s on 2 cores) give a reconstruction one
    # recognises (suit, flag, helmet); 300 steps gave flat colour blocks
    "demo": dict(model="mae_vit_tiny_patch8", img_size=64, data="demo", loader="pil", num_workers=0,
                 batch_size=8, epochs=1600, warmup_epochs=5, lr=2e-3, norm_pix_loss=False, min_crop_scale=1.0,
                 precision="fp32", save_every=500, log_every=100, visualize=True),
    "vit_b16_224": dict(model="mae_vit_base_patch16", img_size=224, batch_size=64, epochs=1600),
    "vit_l16_224": dict(model="mae_vit_large_patch16", img_size=224, batch_size=64, epochs=1600),
    "vit_h14_224": dict(model="mae_vit_huge_patch14", img_size=224, batch_size=64, epochs=1600),
    "vit_h14_448": dict(model="mae_vit_huge_patch14", img_size=448, batch_size=32, epochs=1600,
                        grad_checkpointing=1, precision="bf16", distributed="fsdp"),
}


def build_parser() -> argparse.ArgumentParser:
    """Flags for every config field (``--img-size``; booleans also as ``--no-...``), plus presets."""
    p = dataclass_parser(PretrainConfig, "mae-pretrain",
                         "MAE pretraining with the official recipe as defaults. Start with `mae-pretrain --demo` "
                         "(tiny model, bundled images, CPU, a minute or two).")
    p.add_argument("--demo", action="store_true", help="tiny model on the bundled demo images; writes a "
                   "reconstruction figure (same as --preset demo)")
    add_config_flags(p, PRESETS)
    add_print_config_flag(p)
    return p


def parse_config(argv: Optional[List[str]] = None) -> PretrainConfig:
    """Merge defaults, preset, YAML and flags into a validated PretrainConfig (ConfigError if bad);
    with ``--print-config`` print it and exit 0 instead."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    cfg, args = parse_dataclass_config(PretrainConfig, parser, argv, PRESETS, "demo" if known.demo else None)
    cfg.preset = "demo" if args.demo else args.preset  # names the default run folder
    validate(cfg)
    if args.print_config:
        print_config(cfg, "mae-pretrain" + (f" --preset {cfg.preset}" if cfg.preset else "")
                     + ": every option, resolved (defaults < preset < --config < flags)")
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Checks across options (each field's own range is checked from its metadata)."""
    if cfg.min_lr and cfg.lr is not None and cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    if cfg.activation_dtype == "bf16" and cfg.precision != "bf16":
        raise ConfigError(f"--activation-dtype bf16 needs --precision bf16, got --precision {cfg.precision}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run or replace it")
    if cfg.grow_from:
        try:
            cfg.schedule().check_bounded()
        except ValueError as e:
            raise ConfigError(f"--grow-from {cfg.grow_from} (--img-size {cfg.img_size}): {e}") from None

"""``mae-finetune``: end-to-end fine-tuning of an MAE encoder as a timm VisionTransformer classifier.

    mae-finetune --model vit_large_patch16 --finetune mae_pretrain_vit_large.pth --data /imagenet
    torchrun --nproc_per_node 8 -m mae_fast.train.finetune --model vit_huge_patch14 --img-size 448 ...
    mae-finetune --eval --resume runs/finetune/checkpoints/checkpoint-00050000.pth --data /imagenet

The official recipe (docs/semantics.md §8) is the default: global average pooling + fc_norm, layer-wise lr
decay, drop path, RandAugment, random erasing, mixup/cutmix with label smoothing, 5 warmup epochs then
cosine, evaluation (top-1/top-5) after every epoch. The loop (``fit``) is shared with ``mae-linprobe``:
torchrun DDP, bf16 autocast, checkpoints with exact resume (``--resume auto``), CSV/TensorBoard logs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mae_fast.checkpoint import CheckpointError, check_compatible, encoder_state_dict, extract_state_dict, read_checkpoint
from mae_fast.pos_embed import resize_pos_embed

from mae_fast.device import autocast_for, requested_device_type, resolve_device

from .cli import add_config_flags, dataclass_parser, opt, parse_config as parse_dataclass_config, run_main
from .distributed import DistInfo, ddp_wrap, init_distributed, unwrap
from .loop import RunCheckpoints, StepRunner, find_resume_checkpoint, run_steps
from .optim import fused_available, lr_at, set_lr
from .run_folder import RunLog, use_progress_bar, write_json

log = logging.getLogger("mae_fast.train")

#: encoder shapes (docs/semantics.md §6); ``vit_tiny_patch8`` is ``mae_vit_tiny_patch8``'s encoder (not timm's vit_tiny)
MODELS: Dict[str, Dict[str, int]] = {
    "vit_tiny_patch8": dict(patch_size=8, embed_dim=96, depth=4, num_heads=3),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
#: per-model fine-tune defaults (docs/semantics.md §8)
RECIPE: Dict[str, Dict[str, float]] = {
    "vit_tiny_patch8": dict(blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
    "vit_base_patch16": dict(blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
    "vit_large_patch16": dict(blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50),
    "vit_huge_patch14": dict(blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50),
}


@dataclass
class ClassifierConfig:
    """Options shared by mae-finetune and mae-linprobe."""

    model: str = opt("encoder: " + " | ".join(MODELS), "vit_large_patch16", choices=list(MODELS))
    finetune: str = opt("MAE checkpoint to start from (mae-fast or official; full or encoder-only)", "")
    data: str = opt("ImageFolder tree (one sub-folder per class), or a folder with train/ and val/ trees", "")
    eval_data: str = opt("evaluation ImageFolder tree (default: DATA/val, else DATA itself)", "")
    nb_classes: int = opt("number of classes (0: the number of class folders)", 0)
    img_size: int = opt("input resolution; pos_embed is resized to it", 224)
    batch_size: int = opt("images per process per micro-step", 64)
    accum_iter: int = opt("micro-steps per optimizer step", 1)
    epochs: int = opt("training epochs (0: the recipe's for the model)", 0)
    warmup_epochs: float = opt("linear lr warmup, in epochs (set per iteration)", 5.0)
    blr: Optional[float] = opt("base lr: lr = blr * effective batch / 256 (default: the recipe's)")
    lr: Optional[float] = opt("absolute lr (overrides --blr)")
    min_lr: float = opt("lr at the end of the cosine", 1e-6)
    weight_decay: float = opt("weight decay (not on norms, biases, pos_embed, cls_token)", 0.05)
    crop_pct: Optional[float] = opt("eval center-crop fraction (default 224/256 up to 224 px, else 1.0)")
    precision: str = opt("bf16 (autocast) | fp16 (autocast + GradScaler) | fp32", "bf16", choices=["bf16", "fp16", "fp32"])
    device: str = opt("auto | cpu | cuda", "auto", choices=["auto", "cpu", "cuda"])
    seed: int = opt("seed of data order, augmentation and init", 0)
    num_workers: int = opt("data loader worker processes", 8)
    strict_data: bool = opt("stop at the first unreadable image instead of skipping it", False)
    output_dir: str = opt("checkpoints and logs go here", "runs/finetune")
    save_every: int = opt("checkpoint every N optimizer steps (and after every epoch)", 1000)
    keep_checkpoints: int = opt("keep the newest k checkpoints", 3)
    resume: str = opt("'auto' (newest checkpoint in output-dir), a file, or '' (fresh)", "")
    eval: bool = opt("only evaluate the --resume checkpoint and report accuracy", False)
    log_every: int = opt("log loss and lr every N steps", 20)
    max_steps: int = opt("stop after this many optimizer steps (0: all epochs)", 0)
    tensorboard: bool = opt("write TensorBoard logs when tensorboard is installed", True)
    progress: bool = opt("show a tqdm progress bar", True)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_iter


@dataclass
class FinetuneConfig(ClassifierConfig):
    """mae-finetune options: the official fine-tune recipe as defaults."""

    global_pool: str = opt("avg (mean of patch tokens + fc_norm, official) | token (cls after norm)", "avg",
                           choices=["avg", "token"])
    layer_decay: Optional[float] = opt("layer-wise lr decay (default 0.65 for B, 0.75 for L/H)")
    drop_path: Optional[float] = opt("stochastic depth rate (default 0.1 B, 0.2 L, 0.3 H)")
    clip_grad: Optional[float] = opt("clip the gradient norm to this (default: no clipping)")
    smoothing: float = opt("label smoothing", 0.1)
    mixup: float = opt("mixup alpha (0: off)", 0.8)
    cutmix: float = opt("cutmix alpha (0: off)", 1.0)
    mixup_prob: float = opt("probability of mixup or cutmix per batch", 1.0)
    mixup_switch_prob: float = opt("probability of cutmix instead of mixup when both are on", 0.5)
    mixup_mode: str = opt("batch | pair | elem", "batch", choices=["batch", "pair", "elem"])
    aa: str = opt("timm auto-augment policy ('none': off)", "rand-m9-mstd0.5-inc1")
    reprob: float = opt("random erasing probability", 0.25)
    remode: str = opt("random erasing mode", "pixel")
    recount: int = opt("random erasing count", 1)


def apply_recipe(cfg: ClassifierConfig, recipe: Dict[str, Dict[str, float]]) -> ClassifierConfig:
    """Fill the options left unset (None / 0 epochs) with the model's recipe values; check the rest."""
    for name, value in recipe[cfg.model].items():
        if hasattr(cfg, name) and getattr(cfg, name) in (None, 0):
            setattr(cfg, name, int(value) if name == "epochs" else value)
    for name in ("batch_size", "accum_iter", "epochs", "save_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.data:
        raise ValueError("--data is required (an ImageFolder tree: one sub-folder of images per class)")
    if cfg.eval and not cfg.resume:
        raise ValueError("--eval needs --resume FILE (a fine-tuned checkpoint) or --resume auto")
    return cfg


# ---------------------------------------------------------------- model
def create_classifier(name: str, num_classes: int, img_size: int = 224, global_pool: str = "avg",
                      drop_path: float = 0.0) -> nn.Module:
    """timm VisionTransformer with an MAE encoder's shape; ``avg`` pooling uses fc_norm and no final norm
    (as the official models_vit), ``token`` keeps the final norm and classifies the cls token."""
    from timm.models.vision_transformer import VisionTransformer

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    patch = MODELS[name]["patch_size"]
    if img_size % patch:
        raise ValueError(f"img_size {img_size} is not a multiple of {name}'s patch size {patch}")
    return VisionTransformer(img_size=img_size, num_classes=num_classes, global_pool=global_pool,
                             drop_path_rate=drop_path, mlp_ratio=4.0, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **MODELS[name])


def load_pretrained(model: nn.Module, checkpoint: Any) -> List[str]:
    """Load an MAE checkpoint's encoder (path or dict; full, encoder-only or official) into a
    classifier from :func:`create_classifier`; returns the keys the checkpoint did not give.

    pos_embed is resized bicubically to the model's grid; the MAE ``norm`` is dropped when the model
    pools with fc_norm; a head of another shape is dropped. Raises CheckpointError naming the key and
    both shapes when the checkpoint is of another size, or the first encoder key it lacks.
    """
    source = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    ckpt = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    sd = encoder_state_dict(extract_state_dict(ckpt, source))
    model_sd = model.state_dict()
    for key in [k for k in sd if k.startswith(("norm.", "head.", "fc_norm."))]:
        if key not in model_sd or sd[key].shape != model_sd[key].shape:
            del sd[key]  # MAE norm under fc_norm pooling (official), or another task's head
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape[-1] == model.pos_embed.shape[-1] and pos.shape != model.pos_embed.shape:
        old = pos.shape[1]
        sd["pos_embed"] = resize_pos_embed(pos, model.patch_embed.grid_size[0])
        log.info("pos_embed resized from %d to %d tokens", old, sd["pos_embed"].shape[1])
    missing = check_compatible(model_sd, sd, source)
    encoder_missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if encoder_missing:
        raise CheckpointError(f"{source}: encoder key '{encoder_missing[0]}' is missing ({len(encoder_missing)} "
                              f"keys missing); the checkpoint is not an MAE encoder of this model")
    model.load_state_dict(sd, strict=False)
    return missing


def load_trained(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Load a fine-tuned/linear-probe model state exactly, naming the key and shapes on a mismatch."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing = check_compatible(model.state_dict(), sd, source)
    if missing:
        raise CheckpointError(f"{source}: key '{missing[0]}' is missing ({len(missing)} keys missing); the "
                              f"checkpoint is of another model, pooling (--global-pool) or task")
    model.load_state_dict(sd)


def layer_id(name: str, num_layers: int) -> int:
    """Official ``get_layer_id_for_vit``: embeddings 0, block i -> i + 1, the rest num_layers."""
    if name.startswith(("cls_token", "pos_embed", "reg_token", "patch_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, layer_decay: float = 0.75,
                     no_weight_decay: Optional[set] = None) -> List[Dict[str, Any]]:
    """Official ``param_groups_lrd``: groups with ``lr_scale`` = layer_decay ** (depth + 1 - layer id),
    no weight decay on 1-D parameters (norms, biases) and ``model.no_weight_decay()`` (pos_embed, cls_token)."""
    skip = set(no_weight_decay if no_weight_decay is not None else getattr(model, "no_weight_decay", set)())
    num_layers = len(model.blocks) + 1
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim == 1 or name in skip)
        lid = layer_id(name, num_layers)
        group = groups.setdefault((lid, decay), {"lr_scale": layer_decay ** (num_layers - lid),
                                                 "weight_decay": weight_decay if decay else 0.0, "params": []})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# ---------------------------------------------------------------- loop
def setup(cfg: ClassifierConfig) -> Tuple[DistInfo, torch.device]:
    """Process group (under torchrun) and device; seeds the model init identically on every rank."""
    info = init_distributed(requested_device_type(cfg.device))
    device = resolve_device(cfg.device, info.local_rank)
    torch.manual_seed(cfg.seed)
    return info, device


def seed_training(seed: int, info: DistInfo) -> None:
    """Per-rank seeds for what the step draws (drop path, mixup), as the official seed + rank."""
    import random

    import numpy as np

    torch.manual_seed(seed + info.rank)
    np.random.seed(seed + info.rank)
    random.seed(seed + info.rank)


@torch.no_grad()
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, cfg: ClassifierConfig, device: torch.device,
             info: DistInfo) -> Dict[str, float]:
    """Top-1/top-5 (timm ``accuracy``) and cross-entropy over every evaluation image (all ranks)."""
    from timm.utils import accuracy

    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for imgs, labels in loader:
        with autocast_for(cfg.precision, device):
            out = model(imgs)
        out = out.float()
        acc1, acc5 = accuracy(out, labels, topk=(1, min(5, out.shape[1])))
        n = labels.shape[0]
        stats += torch.stack([F.cross_entropy(out, labels, reduction="sum").double(),
                              torch.as_tensor(acc1 * n / 100, dtype=torch.float64, device=device),
                              torch.as_tensor(acc5 * n / 100, dtype=torch.float64, device=device),
                              torch.tensor(float(n), dtype=torch.float64, device=device)])
    if info.enabled:
        dist.all_reduce(stats)
    model.train(was_training)
    n = max(1.0, stats[3].item())
    return {"acc1": 100 * stats[1].item() / n, "acc5": 100 * stats[2].item() / n, "loss": stats[0].item() / n,
            "images": int(stats[3].item())}


@dataclass
class Task:
    """What differs between fine-tuning and linear probing; the loop in :func:`fit` is shared."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: Any
    eval_loader: Any
    criterion: nn.Module
    base_lr: float
    mixup: Optional[Callable] = None
    clip_grad: Optional[float] = None


def fit(cfg: ClassifierConfig, task: Task, info: DistInfo, device: torch.device) -> Dict[str, Any]:
    """Train ``task.model`` as configured, evaluating after every epoch; returns the summary."""
    out = Path(cfg.output_dir)
    model, optimizer, loader = task.model, task.optimizer, task.train_loader
    if len(loader) < cfg.accum_iter:
        raise ValueError(f"{cfg.data}: {len(loader)} batches of {cfg.batch_size} per process per epoch, fewer "
                         f"than --accum-iter {cfg.accum_iter}: use more images or a smaller batch")
    wrapped = ddp_wrap(model, device) if info.enabled else model
    runner = StepRunner(wrapped, optimizer, cfg.precision, device, info, cfg.accum_iter, max_skips=0,
                        clip_grad=task.clip_grad)
    steps_per_epoch = len(loader) // cfg.accum_iter
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    ckpts = RunCheckpoints(out / "checkpoints", cfg.keep_checkpoints, wrapped, optimizer, runner, loader, info,
                           dataclasses.asdict(cfg))
    state = ckpts.resume(cfg.resume, check=lambda st, source: load_trained(model, st["model"], source))
    step, best, metrics = (int(state["step"]), dict(state.get("best") or {}), {}) if state else (0, {}, {})

    def run_eval(step: int) -> None:
        nonlocal best, metrics
        metrics = evaluate(unwrap(wrapped), task.eval_loader, cfg, device, info)
        if metrics["acc1"] >= best.get("acc1", -1.0):
            best = {"acc1": metrics["acc1"], "acc5": metrics["acc5"], "step": step}
        runlog.write_eval(step, step / steps_per_epoch, {k: metrics[k] for k in ("acc1", "acc5", "loss")})
        if info.is_main:
            log.info("epoch %d (step %d): top-1 %.2f%%, top-5 %.2f%% on %d images (best top-1 %.2f%%)",
                     math.ceil(step / steps_per_epoch), step, metrics["acc1"], metrics["acc5"],
                     metrics["images"], best["acc1"])

    runlog = RunLog(out, info.is_main, cfg.tensorboard)
    eff_batch = cfg.effective_batch * info.world_size
    if info.is_main:
        write_json(out / "config.json", dataclasses.asdict(cfg))
        log.info("%s %s, %d processes, effective batch %d, lr %.3g, %d steps/epoch, %d steps, device %s",
                 task.name, cfg.model, info.world_size, eff_batch, task.base_lr, steps_per_epoch, total_steps, device)

    def set_lr_for(step: int) -> float:
        lr = lr_at(step / steps_per_epoch, task.base_lr, cfg.warmup_epochs, cfg.epochs, cfg.min_lr)
        set_lr(optimizer, lr)
        return lr

    def compute_loss(batch, step: int, micro: int):
        imgs, labels = batch
        targets = labels
        if task.mixup is not None:
            if imgs.shape[0] % 2:  # timm Mixup needs an even batch (an unreadable image was dropped)
                imgs, labels = imgs[:-1], labels[:-1]
            imgs, targets = task.mixup(imgs, labels)
        with autocast_for(cfg.precision, device):
            return task.criterion(wrapped(imgs), targets), imgs.shape[0]

    def after_step(step: int) -> None:
        epoch_end = step % steps_per_epoch == 0
        if epoch_end or step == total_steps:
            run_eval(step)
        if step % cfg.save_every == 0 or epoch_end or step == total_steps:
            ckpts.save(step, best=best, task=task.name)

    wrapped.train()
    start_step = step
    step, last_loss = run_steps(loader, runner, ckpts, step=step, total_steps=total_steps,
                                steps_per_epoch=steps_per_epoch, accum_iter=cfg.accum_iter, log_every=cfg.log_every,
                                set_lr_for=set_lr_for, compute_loss=compute_loss, after_step=after_step,
                                runlog=runlog, progress=task.name if use_progress_bar(cfg.progress) else None)
    runlog.close()
    summary = {"task": task.name, "steps": step, "steps_this_run": step - start_step, "final_loss": last_loss,
               "acc1": metrics.get("acc1"), "acc5": metrics.get("acc5"), "best_acc1": best.get("acc1"),
               "last_checkpoint": str(ckpts.last) if ckpts.last else None, "world_size": info.world_size,
               "effective_batch": eff_batch, "lr": task.base_lr}
    if info.is_main:
        write_json(out / "summary.json", summary)
    return summary


def evaluate_checkpoint(cfg: ClassifierConfig, model: nn.Module, eval_loader: Any, info: DistInfo,
                        device: torch.device) -> Dict[str, float]:
    """``--eval``: load the ``--resume`` checkpoint's model weights and report accuracy only."""
    resumed = find_resume_checkpoint(cfg.resume, Path(cfg.output_dir) / "checkpoints")
    if resumed is None:
        raise FileNotFoundError(f"--resume auto: no checkpoint in {Path(cfg.output_dir) / 'checkpoints'}")
    path, state = resumed
    load_trained(model, extract_state_dict(state, str(path)), str(path))
    metrics = evaluate(model, eval_loader, cfg, device, info)
    if info.is_main:
        log.info("%s: top-1 %.2f%%, top-5 %.2f%% on %d images", path, metrics["acc1"], metrics["acc5"],
                 metrics["images"])
    return metrics


def checkpoint_classes(cfg: ClassifierConfig) -> int:
    """nb_classes stored in the --resume checkpoint's config (0 when there is none)."""
    try:
        resumed = find_resume_checkpoint(cfg.resume, Path(cfg.output_dir) / "checkpoints")
    except CheckpointError:
        return 0
    return int(((resumed[1].get("config") or {}) if resumed else {}).get("nb_classes", 0))


# ---------------------------------------------------------------- mae-finetune
def build_task(cfg: FinetuneConfig, info: DistInfo, device: torch.device) -> Tuple[Task, int]:
    """Data, classifier (MAE weights loaded), AdamW with layer decay, mixup and criterion."""
    from timm.data import Mixup
    from timm.layers import trunc_normal_
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from .finetune_data import (build_labelled_loader, check_classes, eval_transform, num_classes_of, scan_labelled,
                                split_sources, train_transform)

    train_src, eval_src = split_sources(cfg.data, cfg.eval_data)
    eval_images = scan_labelled(eval_src, cfg.strict_data, info.rank, info.world_size)
    train_images = eval_images if cfg.eval or eval_src == train_src else scan_labelled(
        train_src, cfg.strict_data, info.rank, info.world_size)
    if not cfg.nb_classes:
        cfg.nb_classes = (checkpoint_classes(cfg) if cfg.eval else 0) or num_classes_of(train_images)
    check_classes(train_images, eval_images, cfg.nb_classes)
    eval_loader = build_labelled_loader(eval_images, eval_transform(cfg.img_size, cfg.crop_pct), cfg.batch_size,
                                        seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=device,
                                        strict=cfg.strict_data, num_workers=cfg.num_workers, training=False)
    model = create_classifier(cfg.model, cfg.nb_classes, cfg.img_size, cfg.global_pool, cfg.drop_path)
    if cfg.finetune and not cfg.eval:
        missing = load_pretrained(model, cfg.finetune)
        if info.is_main:
            log.info("%s: loaded the encoder; new: %s", cfg.finetune, ", ".join(missing) or "nothing")
    trunc_normal_(model.head.weight, std=2e-5)
    model.to(device)
    seed_training(cfg.seed, info)
    eff_batch = cfg.effective_batch * info.world_size
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay), lr=base_lr,
                                  fused=fused_available(model))
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=cfg.nb_classes)
    criterion = (SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(cfg.smoothing)
                 if cfg.smoothing > 0 else nn.CrossEntropyLoss())
    train_loader = eval_loader
    if not cfg.eval:
        aa = None if cfg.aa.lower() in ("", "none") else cfg.aa
        tf = train_transform(cfg.img_size, aa, cfg.reprob, cfg.remode, cfg.recount)
        train_loader = build_labelled_loader(train_images, tf, cfg.batch_size, seed=cfg.seed, rank=info.rank,
                                             world_size=info.world_size, device=device, strict=cfg.strict_data,
                                             num_workers=cfg.num_workers, training=True)
    task = Task("finetune", model, optimizer, train_loader, eval_loader, criterion, base_lr, mixup, cfg.clip_grad)
    return task, cfg.nb_classes


def run_cli(prog: str, argv: Optional[List[str]], parse: Callable[[Optional[List[str]]], ClassifierConfig],
            build: Callable[[Any, DistInfo, torch.device], Tuple[Task, int]]) -> int:
    """Shared main(): parse, build, train (or ``--eval``), print the summary JSON; errors as one line."""
    def run(cfg: ClassifierConfig) -> Dict[str, Any]:
        info, device = setup(cfg)
        task, _ = build(cfg, info, device)
        if cfg.eval:
            return evaluate_checkpoint(cfg, task.model, task.eval_loader, info, device)
        return fit(cfg, task, info, device)

    return run_main(prog, lambda: parse(argv), run)


def parse_config(argv: Optional[List[str]] = None) -> FinetuneConfig:
    parser = dataclass_parser(FinetuneConfig, "mae-finetune", "Fine-tune an MAE encoder (official recipe as "
                              "defaults; docs/semantics.md §8).")
    add_config_flags(parser)
    return apply_recipe(parse_dataclass_config(FinetuneConfig, parser, argv)[0], RECIPE)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("mae-finetune", argv, parse_config, build_task)


if __name__ == "__main__":
    sys.exit(main())

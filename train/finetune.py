"""``mae-finetune``: end-to-end fine-tuning of an MAE encoder as a timm VisionTransformer classifier.

    mae-finetune --model vit_large_patch16 --finetune mae_pretrain_vit_large.pth --data /imagenet
    torchrun --nproc_per_node 8 -m mae_fast.train.finetune --model vit_huge_patch14 --img-size 448 ...
    mae-finetune --eval --resume runs/finetune/checkpoints/checkpoint-00050000.pth --data /imagenet

The official recipe (docs/semantics.md §8) is the default: global average pooling + fc_norm, layer-wise lr
decay, drop path, RandAugment, random erasing, mixup/cutmix with label smoothing, 5 warmup epochs then
cosine, evaluation (top-1/top-5) after every epoch. The loop (:func:`mae_fast.train.engine.loop.fit`) and the rest
are shared with ``mae-linprobe`` (:mod:`mae_fast.train.evaluation.classifier`): torchrun DDP, bf16 autocast, exact
resume (``--resume auto``), logs, curves.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from mae_fast.device import DistInfo

from .engine.cli import opt, run_main
from .engine.loop import fit
from .engine.optim import fused_available
from .evaluation.classifier import (ClassifierConfig, ClassifierJob, create_classifier, eval_loader_for, evaluate_only,
                                    labelled_images, load_encoder, parse_classifier_config, seed_training,
                                    start_classifier)

log = logging.getLogger("mae_fast.train")

#: per-model fine-tune defaults (docs/semantics.md §8)
RECIPE: Dict[str, Dict[str, float]] = {
    "vit_tiny_patch8": dict(blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
    "vit_base_patch16": dict(blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
    "vit_large_patch16": dict(blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50),
    "vit_huge_patch14": dict(blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50),
}


@dataclass
class FinetuneConfig(ClassifierConfig):
    """mae-finetune options: the official fine-tune recipe as defaults."""

    global_pool: str = opt("avg (mean of patch tokens + fc_norm, official) | token (cls after norm) "
                           "(--eval: the checkpoint's)", "avg", choices=["avg", "token"])
    layer_decay: Optional[float] = opt("layer-wise lr decay (default 0.65 for B, 0.75 for L/H)", above=0, max=1)
    drop_path: Optional[float] = opt("stochastic depth rate (default 0.1 B, 0.2 L, 0.3 H)", min=0, below=1)
    clip_grad: Optional[float] = opt("clip the gradient norm to this (default: no clipping)", above=0)
    smoothing: float = opt("label smoothing", 0.1, min=0, below=1)
    mixup: float = opt("mixup alpha (0: off)", 0.8, min=0)
    cutmix: float = opt("cutmix alpha (0: off)", 1.0, min=0)
    mixup_prob: float = opt("probability of mixup or cutmix per batch", 1.0, min=0, max=1)
    mixup_switch_prob: float = opt("probability of cutmix instead of mixup when both are on", 0.5, min=0, max=1)
    mixup_mode: str = opt("batch | pair | elem", "batch", choices=["batch", "pair", "elem"])
    aa: str = opt("timm auto-augment policy ('none': off)", "rand-m9-mstd0.5-inc1")
    reprob: float = opt("random erasing probability", 0.25, min=0, max=1)
    remode: str = opt("random erasing mode", "pixel", choices=["const", "rand", "pixel"])
    recount: int = opt("random erasing count", 1, min=1)

    task: ClassVar[str] = "finetune"
    identity: ClassVar[Tuple[str, ...]] = ("model", "img_size", "nb_classes", "global_pool")


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


def build_task(cfg: FinetuneConfig, info: DistInfo, device: torch.device) -> ClassifierJob:
    """Data, classifier (MAE weights loaded), AdamW with layer decay, mixup and criterion."""
    from timm.data import Mixup
    from timm.layers import trunc_normal_
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from .data.labelled import build_labelled_loader, train_transform

    train_images, eval_images = labelled_images(cfg, info)
    eval_loader = eval_loader_for(eval_images, cfg, info, device)
    model = create_classifier(cfg.model, cfg.nb_classes, cfg.img_size, cfg.global_pool, cfg.drop_path)
    load_encoder(model, cfg, info)
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
    return ClassifierJob("finetune", cfg, model, optimizer, train_loader, eval_loader, criterion, base_lr, info, device,
                         mixup, cfg.clip_grad)


def parse_config(argv: Optional[List[str]] = None) -> FinetuneConfig:
    return parse_classifier_config(FinetuneConfig, "mae-finetune", "Fine-tune an MAE encoder (official recipe "
                                   "as defaults; docs/semantics.md §8).", argv, RECIPE)


def train(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Fine-tune as configured (or, with ``--eval``, evaluate the ``--resume`` checkpoint); returns the summary."""
    info, device, out = start_classifier(cfg)
    if cfg.eval:
        return evaluate_only(cfg, build_task, info, device)
    return fit(cfg, build_task(cfg, info, device), out)


def main(argv: Optional[List[str]] = None) -> int:
    return run_main("mae-finetune", lambda: parse_config(argv), train)


if __name__ == "__main__":
    sys.exit(main())

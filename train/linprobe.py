"""``mae-linprobe``: linear probing of a frozen MAE encoder (docs/semantics.md §8).

    mae-linprobe --model vit_large_patch16 --finetune mae_pretrain_vit_large.pth --data /imagenet
    torchrun --nproc_per_node 8 -m mae_fast.train.linprobe --model vit_base_patch16 --batch-size 2048 ...

cls token after the encoder's final norm -> BatchNorm1d(affine=False, eps 1e-6) -> Linear (trunc-normal
std 0.01); only that head trains, with LARS (momentum 0.9, no weight decay), lr = blr x batch / 256,
10 warmup epochs then cosine; RandomResizedCrop + flip. The loop is mae-finetune's ``fit``.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .cli import add_config_flags, dataclass_parser, opt, parse_config as parse_dataclass_config
from .distributed import DistInfo
from .finetune import (ClassifierConfig, Task, apply_recipe, checkpoint_classes, create_classifier,
                       load_pretrained, run_cli, seed_training)

log = logging.getLogger("mae_fast.train")

#: per-model linear-probe defaults (docs/semantics.md §8)
RECIPE: Dict[str, Dict[str, float]] = {
    "vit_tiny_patch8": dict(blr=0.1, epochs=90),
    "vit_base_patch16": dict(blr=0.1, epochs=90),
    "vit_large_patch16": dict(blr=0.1, epochs=50),
    "vit_huge_patch14": dict(blr=0.1, epochs=50),
}


@dataclass
class LinprobeConfig(ClassifierConfig):
    """mae-linprobe options: the official linear-probe recipe as defaults."""

    batch_size: int = opt("images per process per micro-step (official: 16384 in all)", 512)
    warmup_epochs: float = opt("linear lr warmup, in epochs (set per iteration)", 10.0)
    min_lr: float = opt("lr at the end of the cosine", 0.0)
    weight_decay: float = opt("LARS weight decay", 0.0)
    output_dir: str = opt("checkpoints and logs go here", "runs/linprobe")
    loader: str = opt("training loader: auto (DALI on GPU when installed, else nvjpeg on GPU) | dali | nvjpeg | pil",
                      "auto", choices=["auto", "dali", "nvjpeg", "pil"])


def linear_head(in_features: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps 1e-6) -> Linear with trunc-normal(std 0.01) weight, zero bias."""
    from timm.layers import trunc_normal_

    fc = nn.Linear(in_features, num_classes)
    trunc_normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.BatchNorm1d(in_features, affine=False, eps=1e-6), fc)


def lars(head: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """timm Lars, momentum 0.9; the trust ratio on matrices only, as the official LARS (1-D: plain SGD)."""
    from timm.optim import Lars

    mats = [p for p in head.parameters() if p.requires_grad and p.ndim > 1]
    vecs = [p for p in head.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": mats, "always_adapt": True}, {"params": vecs, "always_adapt": False, "weight_decay": 0.0}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=0.9, weight_decay=weight_decay)


def build_task(cfg: LinprobeConfig, info: DistInfo, device: torch.device) -> Tuple[Task, int]:
    """Frozen classifier with cls-token pooling and a BatchNorm + Linear head, LARS, light augmentation."""
    from .data import build_loader
    from .finetune_data import (build_labelled_loader, check_classes, eval_transform, num_classes_of,
                                require_labelled, scan_labelled, split_sources)

    train_src, eval_src = split_sources(cfg.data, cfg.eval_data)
    eval_images = scan_labelled(eval_src, cfg.strict_data, info.rank, info.world_size)
    train_loader: Any = None
    if not cfg.eval:
        require_labelled(train_src)
        train_loader = build_loader(train_src, kind=cfg.loader, batch_size=cfg.batch_size, img_size=cfg.img_size,
                                    seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=device,
                                    strict=cfg.strict_data, num_workers=cfg.num_workers, with_labels=True,
                                    drop_last=True, scale=(0.08, 1.0))
    train_images = train_loader.images if train_loader is not None else eval_images
    if not cfg.nb_classes:
        cfg.nb_classes = (checkpoint_classes(cfg) if cfg.eval else 0) or num_classes_of(train_images)
    check_classes(train_images, eval_images, cfg.nb_classes)
    eval_loader = build_labelled_loader(eval_images, eval_transform(cfg.img_size, cfg.crop_pct), cfg.batch_size,
                                        seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=device,
                                        strict=cfg.strict_data, num_workers=cfg.num_workers, training=False)
    model = create_classifier(cfg.model, cfg.nb_classes, cfg.img_size, global_pool="token")
    if cfg.finetune and not cfg.eval:
        missing = load_pretrained(model, cfg.finetune)
        if info.is_main:
            log.info("%s: loaded the encoder; new: %s", cfg.finetune, ", ".join(missing) or "nothing")
    model.head = linear_head(model.head.in_features, cfg.nb_classes)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")
    model.to(device)
    seed_training(cfg.seed, info)
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * cfg.effective_batch * info.world_size / 256
    optimizer = lars(model.head, base_lr, cfg.weight_decay)
    task = Task("linprobe", model, optimizer, train_loader if train_loader is not None else eval_loader,
                eval_loader, nn.CrossEntropyLoss(), base_lr)
    return task, cfg.nb_classes


def parse_config(argv: Optional[List[str]] = None) -> LinprobeConfig:
    parser = dataclass_parser(LinprobeConfig, "mae-linprobe", "Linear probing of a frozen MAE encoder (official "
                              "recipe as defaults; docs/semantics.md §8).")
    add_config_flags(parser)
    return apply_recipe(parse_dataclass_config(LinprobeConfig, parser, argv)[0], RECIPE)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("mae-linprobe", argv, parse_config, build_task)


if __name__ == "__main__":
    sys.exit(main())

"""Optimizer pieces of the MAE recipe: no-decay parameter groups, AdamW, per-iteration lr schedule."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> List[Dict]:
    """Official grouping: no weight decay on 1-D parameters (norms) and biases; cls/mask tokens
    (3-D) ARE decayed, as in the official code. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.Optimizer:
    """torch AdamW over the official groups; its fused kernel on CUDA and CPU (one launch for all
    parameters, and with a GradScaler it skips non-finite steps on the device, without a sync)."""
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr, betas=betas,
                             fused=fused_available(model))


def fused_available(model: nn.Module) -> Optional[bool]:
    """True when torch's fused Adam/AdamW kernel covers every trainable parameter (CUDA or CPU), else None."""
    params = [p for p in model.parameters() if p.requires_grad]
    return (bool(params) and all(p.device.type in ("cuda", "cpu") for p in params)) or None


def lr_at(step: float, base_lr: float, warmup_steps: float, total_steps: float, min_lr: float = 0.0) -> float:
    """Linear warmup from 0, then half-cycle cosine to ``min_lr``; ``step`` may be fractional."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1e-12, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

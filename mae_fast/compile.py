"""``--compile auto|off|blocks|model``: torch.compile applied in place, so ``state_dict`` keys, checkpoints
and DDP / FSDP2 wrapping are unchanged.

``blocks`` compiles each transformer block on its own (regional compilation): the 24-32 identical
encoder blocks and the decoder blocks share one compiled graph per shape, so compile time stays that of
one block while the memory-bound glue inside it (LayerNorm, GELU, residual adds, casts) is fused.
``model`` compiles the whole forward. ``auto`` is ``blocks`` on CUDA and ``off`` on CPU.
"""
from __future__ import annotations

import logging
from typing import Iterable, List

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "off", "blocks", "model")


def resolve_compile_mode(mode: str, device: torch.device) -> str:
    """The concrete mode (off | blocks | model) that ``mode`` means on ``device``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {list(COMPILE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "blocks" if torch.device(device).type == "cuda" else "off"
    return mode


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks of an MAE (``blocks`` + ``decoder_blocks``) or a timm ViT (``blocks``)."""
    found: List[nn.Module] = []
    for name in ("blocks", "decoder_blocks"):
        seq = getattr(model, name, None)
        if isinstance(seq, Iterable):
            found.extend(seq)
    return found


def apply_compile(model: nn.Module, mode: str, device: torch.device) -> str:
    """Compile ``model`` in place as ``mode`` asks (see the module doc); returns the concrete mode used."""
    concrete = resolve_compile_mode(mode, device)
    if concrete == "blocks":
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(f"--compile blocks: {type(model).__name__} has no 'blocks' to compile")
        for blk in blocks:
            blk.compile()
    elif concrete == "model":
        model.compile()
    if concrete != "off":
        log.info("torch.compile: %s (compiled on the first step; its time is logged after it)", concrete)
    return concrete

"""``--compile auto|off|blocks|model``: torch.compile applied in place, so ``state_dict`` keys, checkpoints
and DDP / FSDP2 wrapping are unchanged.

``blocks`` compiles each transformer block's ``forward`` on its own (regional compilation). The blocks
share one code object, and dynamo guards on parameter shapes, not on module identity, so the 24-32
identical encoder blocks reuse one compiled graph (and the decoder blocks a second): compile time
stays that of a block or two while the memory-bound glue inside them (LayerNorm, GELU, residual
adds, casts) is fused. Module hooks (FSDP2's all-gather / reshard, DDP's) run outside the compiled
region, and activation checkpointing, done inside ``Block.forward``, is traced as part of it.
``model`` compiles the whole forward. ``auto`` is ``blocks`` on CUDA and ``off`` on CPU.

Compiled training equals eager training (docs/semantics.md §10.13): Inductor is asked for ``fallback_random``,
so random ops inside a compiled region (fine-tuning's drop path; masking noise drawn in the model) draw
from torch's generator exactly as eager does, not from Inductor's own generator, whose masks differ.
"""
from __future__ import annotations

import logging
from typing import Iterable, List

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "off", "blocks", "model")
#: torch.compile backends: inductor (the fast one), aot_eager / eager (trace only: checks and dry runs)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
#: recompiles allowed per code object: every block site x checkpointing x residual dtype x attention
#: backend is one entry, and a benchmark builds several variants in one process
RECOMPILE_LIMIT = 64


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


def _raise_recompile_limit() -> None:
    """Lift dynamo's per-code-object cache limit to RECOMPILE_LIMIT (never lower it): past the limit
    dynamo silently runs a block eagerly."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the new name, then the old one
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
            return


def _no_autograd_cache_reuse() -> None:
    """Turn off AOTAutograd's cache: on torch 2.14 a warm hit (a second run) loses fallback_random and drop
    path draws other masks than eager (measured on CPU; a cold compile and torch 2.11 match). Inductor's own
    FX graph cache stays on, so a warm start still skips code generation."""
    torch._functorch.config.enable_autograd_cache = False


def compile_options(backend: str) -> dict:
    """torch.compile keyword arguments for ``backend``: static shapes (a new input shape, e.g. the next size of a
    resolution schedule, compiles its own graph instead of a dynamic-shape one); Inductor keeps eager's random
    numbers."""
    options = {"backend": backend, "dynamic": False}  # a callable backend: the tests' graph recorders
    return {**options, "options": {"fallback_random": True}} if backend == "inductor" else options


def compile_block(block: nn.Module, backend: str = "inductor") -> None:
    """Compile ``block.forward`` in place (hooks stay outside; keys unchanged); idempotent."""
    if getattr(block, "_mae_compiled", None) == backend:
        return
    block.forward = torch.compile(type(block).forward.__get__(block), **compile_options(backend))
    block._mae_compiled = backend


def apply_compile(model: nn.Module, mode: str, device: torch.device, backend: str = "inductor") -> str:
    """Compile ``model`` in place as ``mode`` asks (see the module doc); returns the concrete mode used."""
    concrete = resolve_compile_mode(mode, device)
    if not callable(backend) and backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {list(COMPILE_BACKENDS)}, got {backend!r}")
    if concrete == "off":
        return concrete
    _raise_recompile_limit()
    _no_autograd_cache_reuse()
    if concrete == "blocks":
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(f"--compile blocks: {type(model).__name__} has no 'blocks' to compile")
        for blk in blocks:
            compile_block(blk, backend)
        what = f"{len(blocks)} blocks, one graph per distinct block shape"
    else:
        model.compile(**compile_options(backend))
        what = "the whole model"
    log.info("torch.compile %s (%s, backend %s): compiled on the first step, whose time is logged",
             concrete, what, backend)
    return concrete


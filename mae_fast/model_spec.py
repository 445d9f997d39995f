"""One model builder for every command: ``ModelSpec`` (the whole model configuration of a run) and
``build_model`` (the model it describes, set up in one fixed order). mae-pretrain, mae-bench, mae-profile and
the memory planner (``mae_fast.memory``) all build through it, so what one predicts or times is what another
trains.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional, Type

import torch

from .device import compute_dtype
from .models_mae import MaskedAutoencoderViT, create_model


@dataclass(frozen=True)
class ModelSpec:
    """Model, image size, loss, precision, kernels, attention (and the batch and mask ratio ``auto`` attention
    is timed at), residual-stream dtype and activation checkpointing of a run."""

    model: str
    img_size: int = 224
    norm_pix_loss: bool = True
    precision: str = "bf16"
    kernel_backend: str = "auto"
    attn_backend: str = "sdpa"
    batch_size: int = 64
    mask_ratio: float = 0.75
    activation_dtype: str = "fp32"
    grad_checkpointing: int = 0

    @classmethod
    def from_options(cls, options: Any, **overrides: Any) -> "ModelSpec":
        """The spec of a command's parsed options (attributes named as the fields), ``overrides`` taking
        precedence; an option the command lacks and no override gives is an AttributeError, never a default."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"ModelSpec has no field(s) {unknown}")
        return cls(**{n: overrides[n] if n in overrides else getattr(options, n) for n in names})

    @property
    def weight_dtype(self) -> Optional[torch.dtype]:
        """float64 under fp64 (the weights themselves), else None: float32 weights."""
        return torch.float64 if self.precision == "fp64" else None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` while active."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def create_weights(spec: ModelSpec, device: torch.device, cls: Type[MaskedAutoencoderViT],
                   draw_on_device: bool) -> MaskedAutoencoderViT:
    """The initialized model on ``device``: drawn on the CPU then moved (mae-pretrain's weights, the same
    on any device), or with ``draw_on_device`` drawn there in their dtype (seconds for ViT-H on a GPU; the
    only way on fake tensors, which ``Module.to`` cannot convert)."""
    kwargs = dict(img_size=spec.img_size, norm_pix_loss=spec.norm_pix_loss)
    if not draw_on_device:
        return create_model(spec.model, cls=cls, **kwargs).to(device, spec.weight_dtype)
    with torch.device(device), default_dtype(spec.weight_dtype or torch.float32):
        return create_model(spec.model, cls=cls, **kwargs)


def build_model(spec: ModelSpec, device: torch.device, cls: Type[MaskedAutoencoderViT] = MaskedAutoencoderViT,
                draw_on_device: bool = False, self_test: bool = True) -> MaskedAutoencoderViT:
    """The model ``spec`` describes on ``device``, set up in this order: created and moved, kernel backend set and
    self-tested (``self_test``; fake tensors cannot run it), attention chosen, residual dtype and checkpointing set."""
    model = create_weights(spec, device, cls, draw_on_device)
    model.set_kernel_backend(spec.kernel_backend)
    if self_test:
        model.check_kernels(dtype=compute_dtype(spec.precision))
    model.set_attn_backend(spec.attn_backend, dtype=compute_dtype(spec.precision), batch=spec.batch_size,
                           mask_ratio=spec.mask_ratio)
    model.set_activation_dtype(spec.activation_dtype)
    if spec.grad_checkpointing:
        model.set_grad_checkpointing(spec.grad_checkpointing)
    return model

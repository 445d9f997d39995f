"""Analytic FLOPs of a MAE training step, per part, and a cross-check with FlopCounterMode.

Convention: 2 FLOPs per multiply-add (as ``torch.utils.flop_counter``; fvcore and the often-quoted
"17.6 GFLOPs" for ViT-B count 1). Matmuls and attention are counted exactly as the model computes
them; backward is 2x forward for every matmul whose input needs a gradient, 1x for the patch
embedding (pixels need no gradient). LayerNorm, GELU, softmax, gathers are not counted; the loss is
reported separately as an estimate of its elementwise work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .models_mae import MAEConfig, MaskedAutoencoderViT, create_model


@dataclass
class Part:
    """FLOPs of one part of the model, per image."""

    name: str
    forward: float
    backward: float
    matmul: bool = True  # False: elementwise estimate, not seen by FlopCounterMode

    @property
    def training(self) -> float:
        return self.forward + self.backward


def _blocks(depth: int, tokens: int, dim: int, mlp_ratio: float) -> Dict[str, float]:
    """Forward FLOPs of ``depth`` pre-norm blocks on ``tokens`` tokens: linear layers and attention."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * dim * (3 * dim + dim) + 2 * tokens * dim * hidden * 2  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * dim  # q k^T and attn @ v over all heads
    return {"linear": depth * linear, "attention": depth * attention}


@dataclass
class FlopsReport:
    """Per-image FLOPs and parameter counts of one model configuration."""

    model: str
    config: MAEConfig
    mask_ratio: float
    parts: List[Part]
    params: Dict[str, int] = field(default_factory=dict)
    encoder_with_mask_tokens: Dict[str, float] = field(default_factory=dict)
    counter_check: Optional[Dict[str, float]] = None

    def total(self, kind: str = "training", matmul_only: bool = False) -> float:
        return sum(getattr(p, kind) for p in self.parts if p.matmul or not matmul_only)

    def group(self, prefix: str, kind: str = "forward") -> float:
        return sum(getattr(p, kind) for p in self.parts if p.name.startswith(prefix))

    @property
    def tokens(self) -> Dict[str, int]:
        L = self.config.num_patches
        keep = int(L * (1 - self.mask_ratio))
        return {"patches": L, "visible": keep, "encoder": 1 + keep, "decoder": 1 + L}

    @property
    def decoder_vs_encoder_per_token(self) -> float:
        """Forward FLOPs per decoder token over forward FLOPs per encoder token (paper: ~9% for ViT-L)."""
        t = self.tokens
        enc = self.group("encoder") + self.group("patch_embed")
        dec = self.group("decoder") + self.group("pred_head")
        return (dec / t["decoder"]) / (enc / t["encoder"])

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "config": self.config.to_dict(),
            "mask_ratio": self.mask_ratio,
            "tokens": self.tokens,
            "flops_per_image": {
                p.name: {"forward": p.forward, "backward": p.backward, "training": p.training,
                         "counted_by_flop_counter": p.matmul}
                for p in self.parts
            },
            "total_per_image": {"forward": self.total("forward"), "training": self.total("training")},
            "params": self.params,
            "encoder_with_mask_tokens": self.encoder_with_mask_tokens,
            "decoder_vs_encoder_per_token": self.decoder_vs_encoder_per_token,
            "flop_counter_check": self.counter_check,
            "convention": "2 FLOPs per multiply-add; per image",
        }


def analytic_parts(cfg: MAEConfig, mask_ratio: float = 0.75, all_patches: bool = False) -> List[Part]:
    """Per-image FLOPs per part. ``all_patches``: the encoder sees every patch (BEiT-style mask tokens)."""
    L, P, D, Dd = cfg.num_patches, cfg.patch_dim, cfg.embed_dim, cfg.decoder_embed_dim
    keep = L if all_patches else int(L * (1 - mask_ratio))
    T, Td = 1 + keep, 1 + L
    enc = _blocks(cfg.depth, T, D, cfg.mlp_ratio)
    dec = _blocks(cfg.decoder_depth, Td, Dd, cfg.mlp_ratio)
    patch_embed = 2.0 * keep * P * D
    dec_embed = 2.0 * T * D * Dd
    pred = 2.0 * Td * Dd * P
    # loss, elementwise: target stats (mean, unbiased var, normalize ~6 ops/value) and squared error
    # (sub, square, mean ~3 ops/value) on every patch; backward ~3 ops/value.
    loss_fwd = L * P * (3 + (6 if cfg.norm_pix_loss else 0))
    return [
        Part("patch_embed", patch_embed, patch_embed),  # weight gradient only
        Part("encoder_linear", enc["linear"], 2 * enc["linear"]),
        Part("encoder_attention", enc["attention"], 2 * enc["attention"]),
        Part("decoder_embed", dec_embed, 2 * dec_embed),
        Part("decoder_linear", dec["linear"], 2 * dec["linear"]),
        Part("decoder_attention", dec["attention"], 2 * dec["attention"]),
        Part("pred_head", pred, 2 * pred),
        Part("loss", loss_fwd, 3.0 * L * P, matmul=False),
    ]


def parameter_counts(model: MaskedAutoencoderViT) -> Dict[str, int]:
    """Trainable parameters of encoder and decoder (the fixed sin-cos tables are not counted)."""
    enc = dec = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("decoder_", "mask_token")):
            dec += p.numel()
        else:
            enc += p.numel()
    return {"encoder": enc, "decoder": dec, "total": enc + dec}


def build_on_meta(name: str, **kwargs) -> MaskedAutoencoderViT:
    """Build a model on the meta device: shapes only, no memory, seconds even for ViT-H."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def count_flops(name: str, mask_ratio: float = 0.75, check: bool = False, **model_kwargs) -> FlopsReport:
    """Analytic per-image FLOPs of model ``name``; with ``check`` also measure with FlopCounterMode."""
    model = build_on_meta(name, **model_kwargs)
    model.num_visible(mask_ratio)  # validates the ratio
    cfg = model.config
    parts = analytic_parts(cfg, mask_ratio)
    full = analytic_parts(cfg, mask_ratio, all_patches=True)
    report = FlopsReport(name, cfg, mask_ratio, parts, params=parameter_counts(model))
    enc_fwd = report.group("encoder") + report.group("patch_embed")
    enc_full = sum(p.forward for p in full if p.name.startswith(("encoder", "patch_embed")))
    report.encoder_with_mask_tokens = {
        "encoder_forward": enc_full,
        "encoder_ratio": enc_full / enc_fwd,
        "model_training": sum(p.training for p in full),
        "model_ratio": sum(p.training for p in full) / report.total("training"),
    }
    if check:
        report.counter_check = flop_counter_check(model, mask_ratio, report)
    return report


def measure_with_flop_counter(model: MaskedAutoencoderViT, mask_ratio: float = 0.75, batch: int = 2) -> Dict[str, float]:
    """Per-image forward and training FLOPs as ``FlopCounterMode`` counts them on the meta device.

    On meta, SDPA runs its math decomposition (matmuls), which FlopCounterMode counts; on CPU
    tensors it would count 0 for SDPA's fused CPU kernel.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    cfg = model.config
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    with FlopCounterMode(display=False) as fwd_counter:
        loss, _, _ = model(imgs, mask_ratio=mask_ratio)
    forward = fwd_counter.get_total_flops()
    with FlopCounterMode(display=False) as bwd_counter:
        loss.backward()
    backward = bwd_counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    return {"forward": forward / batch, "training": (forward + backward) / batch}


def flop_counter_check(model: MaskedAutoencoderViT, mask_ratio: float, report: FlopsReport) -> Dict[str, float]:
    """Compare the analytic matmul FLOPs with FlopCounterMode's; relative differences in the result."""
    measured = measure_with_flop_counter(model, mask_ratio)
    out = {}
    for kind in ("forward", "training"):
        analytic = report.total(kind, matmul_only=True)
        out[f"{kind}_counter"] = measured[kind]
        out[f"{kind}_analytic"] = analytic
        out[f"{kind}_rel_diff"] = abs(analytic - measured[kind]) / measured[kind]
    return out

"""The official MAE forward pass, once: the tests' ground truth and mae-bench's "official" variant.

``official_forward`` computes on an mae-fast model's parameters what facebookresearch/mae's
``models_mae.py`` (timm 0.3.2 blocks) computes, op for op: conv-embed all L patches, add positions,
random masking by argsort of the noise (``masking_reference``) with a ones/zeros mask and a gather,
keep 25%; explicit softmax attention (timm's order); decoder with ``repeat``-ed mask tokens, a gather
and a concatenation; the loss over every patch, then weighted by the mask (docs/semantics.md §1-§4).
It calls the parameters with ``torch.nn.functional`` ops, never the model's modules, so nothing of
mae-fast's own (visible-only embedding, Triton kernels, SDPA, checkpointing, compile, residual dtype)
enters it, whatever the model class gains later: a ratio is only as honest as its baseline, and a
test only as strict as its reference. mae-bench runs ``OfficialMAE`` with fp16 autocast, GradScaler
and foreach AdamW, as the official script does.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_fast.kernels._utils import masking_reference, patchify_reference
from mae_fast.models_mae import MaskedAutoencoderViT, create_model

LN_EPS = 1e-6  # the official models' LayerNorm eps (partial(nn.LayerNorm, eps=1e-6))


def official_random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``random_masking``: (x_masked, mask, ids_restore) of tokens ``x`` (N, L, D); the noise
    is ``torch.rand(N, L)`` when not given."""
    N, L, D = x.shape
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    m = masking_reference(noise, mask_ratio)
    x_masked = torch.gather(x, dim=1, index=m.ids_keep.unsqueeze(-1).repeat(1, 1, D))
    return x_masked, m.mask, m.ids_restore


def official_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm 0.3.2's ``Block`` on ``blk``'s parameters: x + attn(LN(x)), then x + mlp(LN(x)), math attention."""
    B, N, C = x.shape
    a = blk.attn
    h = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, LN_EPS)
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).reshape(B, N, 3, a.num_heads, C // a.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (C // a.num_heads) ** -0.5
    attn = attn.softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(h, a.proj.weight, a.proj.bias)
    h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, LN_EPS)
    h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + h


def official_encoder(m: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float,
                     noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``forward_encoder``: (latent (N, 1+len_keep, D), mask (N, L), ids_restore (N, L))."""
    x = F.conv2d(imgs, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=m.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = x + m.pos_embed[:, 1:, :]
    x, mask, ids_restore = official_random_masking(x, mask_ratio, noise)
    cls_token = m.cls_token + m.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in m.blocks:
        x = official_block(blk, x)
    return F.layer_norm(x, (x.shape[-1],), m.norm.weight, m.norm.bias, LN_EPS), mask, ids_restore


def official_decoder(m: MaskedAutoencoderViT, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """The official ``forward_decoder``: latent (N, 1+len_keep, D) -> predictions (N, L, p*p*3)."""
    x = F.linear(x, m.decoder_embed.weight, m.decoder_embed.bias)
    mask_tokens = m.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        x = official_block(blk, x)
    x = F.layer_norm(x, (x.shape[-1],), m.decoder_norm.weight, m.decoder_norm.bias, LN_EPS)
    return F.linear(x, m.decoder_pred.weight, m.decoder_pred.bias)[:, 1:, :]


def official_loss(m: MaskedAutoencoderViT, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
                  ) -> torch.Tensor:
    """The official ``forward_loss``: per-patch MSE (to normalized pixels with norm_pix_loss), averaged over
    the removed patches."""
    target = patchify_reference(imgs, m.patch_size)
    if m.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def official_forward(m: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float = 0.75,
                     noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, pred, mask) of ``m``'s parameters exactly as facebookresearch/mae computes them."""
    latent, mask, ids_restore = official_encoder(m, imgs, mask_ratio, noise)
    pred = official_decoder(m, latent, ids_restore)
    return official_loss(m, imgs, pred, mask), pred, mask


class OfficialMAE(MaskedAutoencoderViT):
    """``MaskedAutoencoderViT`` whose forward pieces are the official ones above (for mae-bench)."""

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        return official_random_masking(x, mask_ratio, noise)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        return official_encoder(self, imgs, mask_ratio, noise)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return official_decoder(self, x, ids_restore)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return official_loss(self, imgs, pred, mask)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: Optional[torch.Tensor] = None):
        return official_forward(self, imgs, mask_ratio, noise)


def official_model(name: str, **kwargs) -> OfficialMAE:
    """Build model ``name`` computing the official way (math attention and PyTorch ops recorded as such)."""
    return create_model(name, cls=OfficialMAE, **{"attn_backend": "math", "kernel_backend": "torch", **kwargs})

"""The official code's way of computing MAE, for side-by-side benchmarks (variant "official").

Same parameters and results as ``MaskedAutoencoderViT``, computed as facebookresearch/mae does:
conv-embed all L patches, add positions, then keep 25%; plain matmul-softmax attention. mae-bench
runs it with fp16 autocast and a GradScaler, as the official training script does.
"""
from __future__ import annotations

from typing import Optional

import torch

from mae_fast.models_mae import MaskedAutoencoderViT, create_model


class OfficialMAE(MaskedAutoencoderViT):
    """``MaskedAutoencoderViT`` with the official encoder path (embed-then-gather, math attention)."""

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore


def official_model(name: str, **kwargs) -> OfficialMAE:
    """Build model ``name`` with the official compute path and math attention."""
    return create_model(name, cls=OfficialMAE, **{"attn_backend": "math", **kwargs})

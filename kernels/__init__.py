"""Triton ops for MAE (issue 3), each with a plain-PyTorch reference beside it.

Every public op takes ``backend="auto" | "triton" | "torch"``: "auto" runs Triton on CUDA tensors and
the reference elsewhere; "triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (tests).
"""
from .masked_loss import masked_loss, masked_loss_reference
from .patch_embed_gather import patch_embed_gather, patch_embed_gather_reference
from .unshuffle import unshuffle_mask_tokens, unshuffle_mask_tokens_reference

__all__ = [
    "masked_loss",
    "masked_loss_reference",
    "patch_embed_gather",
    "patch_embed_gather_reference",
    "unshuffle_mask_tokens",
    "unshuffle_mask_tokens_reference",
]

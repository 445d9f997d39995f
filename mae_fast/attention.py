"""Attention backends behind one function: the seam where faster kernels plug in.

Every backend takes the fused qkv projection reshaped to (B, N, 3, heads, head_dim) and
returns (B, N, heads, head_dim), so a backend that wants the BMHK layout (xformers) needs
no transposes and one that wants BHNK (SDPA) does its own.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor], torch.Tensor]


def sdpa_attention(qkv: torch.Tensor) -> torch.Tensor:
    """PyTorch ``scaled_dot_product_attention`` (flash / cuDNN / efficient / math, chosen by torch)."""
    q, k, v = qkv.transpose(1, 3).unbind(2)  # each (B, heads, N, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def math_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v in matmuls: the readable reference, as the official code."""
    q, k, v = qkv.transpose(1, 3).unbind(2)
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2)


ATTENTION_BACKENDS: Dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "math": math_attention,
}


def get_attention(backend: str) -> AttentionFn:
    """Look up an attention backend by name; unknown names list the known ones."""
    try:
        return ATTENTION_BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown attn_backend {backend!r}; choose one of {sorted(ATTENTION_BACKENDS)}"
        ) from None

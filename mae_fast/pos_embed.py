"""Fixed 2-D sin-cos position tables and their resizing (docs/semantics.md §2)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Sin-cos table (M, embed_dim) for positions ``pos``: [sin(pos*w_k) ..., cos(pos*w_k) ...]."""
    if embed_dim % 2 != 0:
        raise ValueError(f"1-D sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False,
                            span: Optional[int] = None) -> np.ndarray:
    """Table (g*g [+1], embed_dim) in float64: first half encodes the column, second the row.

    Row-major patch order (index = row * g + col); with ``cls_token`` a zero row comes first. Positions are the
    patch indices 0 .. g-1 (the official code), or with ``span`` each patch's centre in the units of a
    ``span`` x ``span`` grid over the same image ((i + 0.5) * span / g - 0.5: progressive resolution's
    "scaled" tables, equal to the official ones when ``span`` is g).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    if span is not None and span != grid_size:
        coords = (coords + 0.5) * span / grid_size - 0.5
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    emb = np.concatenate(
        [get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)],
        axis=1,
    )
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize a (1, extra + g*g, D) table to ``new_grid`` x ``new_grid`` patches.

    The extra (cls) rows are kept as they are; the patch rows are resized bicubically with
    align_corners=False, as the official ``interpolate_pos_embed`` does. Returns the input dtype.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    n_patch = pos_embed.shape[1] - num_extra_tokens
    old_grid = int(round(n_patch**0.5))
    if old_grid * old_grid != n_patch:
        raise ValueError(
            f"pos_embed has {n_patch} patch rows after {num_extra_tokens} extra token(s): not a square grid"
        )
    if old_grid == new_grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    extra, patches = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    patches = patches.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([extra, patches], dim=1)

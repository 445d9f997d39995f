"""Decoder unshuffle with mask tokens, fused with the decoder position embedding.

out[n, 0]     = x[n, 0] + pos[0]
out[n, 1 + j] = (x[n, 1 + ids_restore[n, j]] if ids_restore[n, j] < K else mask_token) + pos[1 + j]

Forward (one Triton kernel, one pass): each output row is read from its source token or from the
mask token, the position row is added and the row is written once; the reference's cat / expand /
gather / cat / add (four full-size intermediates) collapse into this single write.

Backward (one Triton kernel, one pass over grad_out): rows that came from x are scattered to grad_x
(every grad_x row is written exactly once, since ids_restore is a permutation); rows that came from the
mask token are summed in float32: each program walks a fixed range of rows (the partition depends on the
shape only) into one row of a small (<= 256, Dd) partial buffer, which torch sums afterwards in a fixed
order (no atomics: same inputs give the same bits). grad of pos (frozen in MAE) is a torch sum.
"""
from __future__ import annotations

import torch

from typing import Dict, Tuple

from ._utils import launch, new_empty, tl, triton, use_triton

__all__ = ["unshuffle_mask_tokens", "unshuffle_mask_tokens_reference", "unshuffle_config"]


# ----------------------------------------------------------------------------- reference
def unshuffle_mask_tokens_reference(
    x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor
) -> torch.Tensor:
    """Official decoder code: append mask tokens, gather with ids_restore, put cls back, + pos."""
    N, T, Dd = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.expand(N, L + 1 - T, Dd)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _unshuffle_fwd_kernel(
    x_ptr, mt_ptr, ids_ptr, pos_ptr, out_ptr,
    R, L, K, Dd,
    s_xn, s_xt, s_xd,
    s_md,
    s_idn, s_idl,
    s_pt, s_pd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # flat output row n * (1 + L) + j
    r_ok = r < R
    n = r // (L + 1)
    j = r % (L + 1)
    src = tl.load(ids_ptr + n.to(tl.int64) * s_idn + (j - 1) * s_idl, mask=r_ok & (j > 0), other=-1)
    from_x = (j == 0) | (src < K)
    t = src + 1  # 0 for the cls row
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < Dd
    ok = r_ok[:, None] & d_ok[None, :]
    xv = tl.load(x_ptr + n.to(tl.int64)[:, None] * s_xn + t[:, None] * s_xt + d[None, :] * s_xd,
                 mask=ok & from_x[:, None], other=0.0).to(tl.float32)
    mt = tl.load(mt_ptr + d * s_md, mask=d_ok, other=0.0).to(tl.float32)
    v = tl.where(from_x[:, None], xv, mt[None, :])
    pos = tl.load(pos_ptr + j[:, None] * s_pt + d[None, :] * s_pd, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * Dd + d[None, :], (v + pos).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unshuffle_bwd_kernel(
    g_ptr, ids_ptr, gx_ptr, part_ptr,
    R, L, K, Dd, T, ROWS,
    s_gn, s_gt, s_gd,
    s_idn, s_idl,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (c, d) walks output rows c*ROWS .. (c+1)*ROWS: scatters rows from x to grad_x and sums
    the mask-token rows in float32, in a fixed order, into part[c] (no atomics)."""
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < Dd
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first = pid_c * ROWS
    for r0 in range(first, first + ROWS, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        n = r // (L + 1)
        j = r % (L + 1)
        src = tl.load(ids_ptr + n.to(tl.int64) * s_idn + (j - 1) * s_idl, mask=r_ok & (j > 0), other=-1)
        to_x = (j == 0) | (src < K)
        ok = r_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + n.to(tl.int64)[:, None] * s_gn + j[:, None] * s_gt + d[None, :] * s_gd,
                    mask=ok, other=0.0).to(tl.float32)
        dst = n.to(tl.int64) * T + (src + 1)
        tl.store(gx_ptr + dst[:, None] * Dd + d[None, :], g.to(gx_ptr.dtype.element_ty), mask=ok & to_x[:, None])
        acc += tl.sum(tl.where(to_x[:, None], 0.0, g), axis=0)
    tl.store(part_ptr + pid_c.to(tl.int64) * Dd + d, acc, mask=d_ok)


# ----------------------------------------------------------------------------- launch configuration
MAX_PARTIALS = 256


def unshuffle_config(R: int, Dd: int) -> Dict[str, int]:
    """Tiles of both unshuffle kernels for R = N * (1 + L) output rows of width Dd, and the rows each
    backward program walks (a multiple of BLOCK_R; at most MAX_PARTIALS partial rows of the mask-token
    gradient); used by the launch, the interpreter tests and ``mae_fast.bench.kernel_resources``."""
    block_r = 8
    rows = max(4 * block_r, triton.cdiv(triton.cdiv(max(R, 1), MAX_PARTIALS), block_r) * block_r)
    return dict(BLOCK_R=block_r, BLOCK_D=min(256, triton.next_power_of_2(Dd)), ROWS=rows, num_warps=4)


# ----------------------------------------------------------------------------- custom ops
def _out_dtype(x: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, mask_token.dtype), pos.dtype)


def _forward(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    N, T, Dd = x.shape
    L = ids_restore.shape[1]
    out = new_empty((N, L + 1, Dd), _out_dtype(x, mask_token, pos), x.device)
    R = N * (L + 1)
    if R == 0 or Dd == 0:
        return out
    cfg = unshuffle_config(R, Dd)
    mt = mask_token.reshape(Dd)
    pos2 = pos.reshape(L + 1, Dd)
    grid = (triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(Dd, cfg["BLOCK_D"]))
    launch(_unshuffle_fwd_kernel, grid, dict(
        x_ptr=x, mt_ptr=mt, ids_ptr=ids_restore, pos_ptr=pos2, out_ptr=out, R=R, L=L, K=T - 1, Dd=Dd,
        **dict(zip(("s_xn", "s_xt", "s_xd"), x.stride())), s_md=mt.stride(0),
        **dict(zip(("s_idn", "s_idl"), ids_restore.stride())), **dict(zip(("s_pt", "s_pd"), pos2.stride())),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"]), dict(num_warps=cfg["num_warps"]))
    return out


@torch.library.custom_op("mae_fast::unshuffle_mask_tokens", mutates_args=())
def _unshuffle_op(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return _forward(x, mask_token, ids_restore, pos)


@_unshuffle_op.register_fake
def _(x, mask_token, ids_restore, pos):
    N, T, Dd = x.shape
    return x.new_empty((N, ids_restore.shape[1] + 1, Dd), dtype=_out_dtype(x, mask_token, pos))


def _backward_kernels(grad_out: torch.Tensor, ids_restore: torch.Tensor, T: int, x_dtype: torch.dtype
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x (N, T, Dd) in x's dtype, float32 partial sums of the mask-token grad, one row per
    backward row range: at most MAX_PARTIALS x Dd)."""
    N, L = ids_restore.shape
    Dd = grad_out.shape[-1]
    R = N * (L + 1)
    cfg = unshuffle_config(R, Dd)
    n_part = triton.cdiv(R, cfg["ROWS"])
    grad_x = new_empty((N, T, Dd), x_dtype, grad_out.device)
    part = new_empty((n_part, Dd), torch.float32, grad_out.device)
    if R == 0 or Dd == 0:
        return grad_x, part.zero_()
    launch(_unshuffle_bwd_kernel, (n_part, triton.cdiv(Dd, cfg["BLOCK_D"])), dict(
        g_ptr=grad_out, ids_ptr=ids_restore, gx_ptr=grad_x, part_ptr=part, R=R, L=L, K=T - 1, Dd=Dd, T=T,
        ROWS=cfg["ROWS"], **dict(zip(("s_gn", "s_gt", "s_gd"), grad_out.stride())),
        **dict(zip(("s_idn", "s_idl"), ids_restore.stride())),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"]), dict(num_warps=cfg["num_warps"]))
    return grad_x, part


@torch.library.custom_op("mae_fast::unshuffle_mask_tokens_backward", mutates_args=())
def _unshuffle_bwd_op(
    grad_out: torch.Tensor, ids_restore: torch.Tensor, T: int, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_kernels(grad_out, ids_restore, T, x_dtype)


@_unshuffle_bwd_op.register_fake
def _(grad_out, ids_restore, T, x_dtype):
    N, L = ids_restore.shape
    Dd = grad_out.shape[-1]
    n_part = triton.cdiv(N * (L + 1), unshuffle_config(N * (L + 1), Dd)["ROWS"])
    return grad_out.new_empty((N, T, Dd), dtype=x_dtype), grad_out.new_empty((n_part, Dd), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, mask_token, ids_restore, pos = inputs
    ctx.save_for_backward(ids_restore)
    ctx.T, ctx.x_dtype = x.shape[1], x.dtype  # x itself is not kept
    ctx.mt_shape, ctx.mt_dtype = mask_token.shape, mask_token.dtype
    ctx.pos_shape, ctx.pos_dtype = pos.shape, pos.dtype


def _backward(ctx, grad_out: torch.Tensor):
    (ids_restore,) = ctx.saved_tensors
    need_x, need_mt, _, need_pos = ctx.needs_input_grad
    grad_x = grad_mt = grad_pos = None
    if need_x or need_mt:
        gx, part = _unshuffle_bwd_op(grad_out, ids_restore, ctx.T, ctx.x_dtype)
        grad_x = gx if need_x else None
        if need_mt:
            grad_mt = part.sum(0).to(ctx.mt_dtype).reshape(ctx.mt_shape)
    if need_pos:
        grad_pos = grad_out.sum(0, dtype=torch.float32).to(ctx.pos_dtype).reshape(ctx.pos_shape)
    return grad_x, grad_mt, None, grad_pos


_unshuffle_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public
def unshuffle_mask_tokens(
    x: torch.Tensor,
    mask_token: torch.Tensor,
    ids_restore: torch.Tensor,
    pos_embed: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Decoder tokens x (N, 1+K, Dd) -> (N, 1+L, Dd): cls row, then kept tokens / mask_token (1, 1, Dd)
    in patch order given by ids_restore (N, L), plus pos_embed (1, 1+L, Dd). Dtype follows torch's
    type promotion of x, mask_token and pos_embed (as the reference's cat + add).

    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
    """
    if not use_triton(backend, (x, mask_token, ids_restore, pos_embed), "unshuffle_mask_tokens"):
        return unshuffle_mask_tokens_reference(x, mask_token, ids_restore, pos_embed)
    N, T, Dd = x.shape
    L = ids_restore.shape[1]
    if mask_token.numel() != Dd or pos_embed.numel() != (L + 1) * Dd or ids_restore.shape[0] != N:
        raise ValueError(
            f"unshuffle_mask_tokens: shapes do not fit: x {tuple(x.shape)}, mask_token "
            f"{tuple(mask_token.shape)}, ids_restore {tuple(ids_restore.shape)}, pos_embed {tuple(pos_embed.shape)}"
        )
    return _unshuffle_op(x, mask_token, ids_restore, pos_embed)

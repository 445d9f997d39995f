"""Shuffle-gather masking fused around the patch-embed GEMM.

out[n, k] = W @ patch(imgs[n], ids_keep[n, k]) + b + pos[ids_keep[n, k]]       (N, K, D)

Forward (one Triton kernel): for each tile of output rows the kernel reads ``ids_keep``, loads the
kept patches straight from the NCHW image (patchify + gather happen in the address computation; the
masked patches are never read and no (N, L, P) or (N, K, P) patch tensor is written), runs the GEMM
with ``tl.dot`` (float32 accumulation) and adds bias and the gathered position rows in the epilogue.

Backward: the two big GEMMs are cuBLAS matmuls (``torch.mm``); Triton does the data movement around
them: one kernel re-gathers the kept patches (N*K, P) for the weight gradient, one kernel writes the
image gradient in NCHW layout straight from the (N*K, P) patch gradient (zeros at masked patches, every
pixel written once, no zero-fill pass and no atomics). Bias / pos gradients are torch reductions
(``pos`` is frozen in MAE pretraining; its index_add_ is not deterministic on CUDA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import autocast_dtype, check_patch_grid, interpreting, new_empty, patchify_reference, tl, triton, use_triton

__all__ = ["patch_embed_gather", "patch_embed_gather_reference"]


# ----------------------------------------------------------------------------- reference
def patch_embed_gather_reference(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """Plain PyTorch: linear(gather(patchify(imgs), ids_keep), weight, bias) + pos_embed[ids_keep]."""
    patches = patchify_reference(imgs, patch_size)
    patches = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    x = F.linear(patches.to(weight.dtype), weight, bias)
    return x + pos_embed[ids_keep]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _pe_fwd_kernel(
    img_ptr, ids_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
    M, K, D, P, GW,
    s_in, s_ic, s_ih, s_iw,
    s_idn, s_idk,
    s_wd, s_wk,
    s_b,
    s_pl, s_pd,
    PS: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n = rm // K
    kk = rm % K
    idx = tl.load(ids_ptr + n.to(tl.int64) * s_idn + kk * s_idk, mask=m_ok, other=0)
    prow = idx // GW
    pcol = idx % GW
    row_off = n.to(tl.int64) * s_in + (prow * PS).to(tl.int64) * s_ih + (pcol * PS).to(tl.int64) * s_iw

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # reduction index in patchify order (py, px, c)
        k_ok = rk < P
        py = rk // (PS * C)
        px = (rk // C) % PS
        ch = rk % C
        col_off = ch * s_ic + py * s_ih + px * s_iw
        a = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wd, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a.to(w.dtype), w)
    b = tl.load(b_ptr + rn * s_b, mask=n_ok, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + idx[:, None] * s_pl + rn[None, :] * s_pd, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    acc += b[None, :] + pos.to(tl.float32)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * D + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _pe_gather_kernel(
    img_ptr, ids_ptr, out_ptr,
    M, K, P, GW,
    s_in, s_ic, s_ih, s_iw,
    s_idn, s_idk,
    PS: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[m, :] = patchify(imgs)[m // K, ids_keep[m // K, m % K], :] (cast to out dtype)."""
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n = rm // K
    idx = tl.load(ids_ptr + n.to(tl.int64) * s_idn + (rm % K) * s_idk, mask=m_ok, other=0)
    row_off = n.to(tl.int64) * s_in + ((idx // GW) * PS).to(tl.int64) * s_ih + ((idx % GW) * PS).to(tl.int64) * s_iw
    rk = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    k_ok = rk < P
    col_off = (rk % C) * s_ic + (rk // (PS * C)) * s_ih + ((rk // C) % PS) * s_iw
    ok = m_ok[:, None] & k_ok[None, :]
    v = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * P + rk[None, :], v.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _pe_scatter_kernel(
    gp_ptr, slot_ptr, gimg_ptr,
    NL, L, K, P, GW,
    s_gn, s_gc, s_gh, s_gw,
    PS: tl.constexpr, C: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_imgs at patch (n, l) = grad_patches[n*K + slot[n, l]] (unpatchified), or 0 if slot < 0."""
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat patch index n * L + l
    m_ok = rm < NL
    n = rm // L
    l = rm % L
    slot = tl.load(slot_ptr + rm, mask=m_ok, other=-1)
    kept = slot >= 0
    src_row = n.to(tl.int64) * K + tl.maximum(slot, 0)
    rk = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    k_ok = rk < P
    g = tl.load(gp_ptr + src_row[:, None] * P + rk[None, :], mask=(m_ok & kept)[:, None] & k_ok[None, :], other=0.0)
    row_off = n.to(tl.int64) * s_gn + ((l // GW) * PS).to(tl.int64) * s_gh + ((l % GW) * PS).to(tl.int64) * s_gw
    col_off = (rk % C) * s_gc + (rk // (PS * C)) * s_gh + ((rk // C) % PS) * s_gw
    tl.store(gimg_ptr + row_off[:, None] + col_off[None, :], g.to(gimg_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- launch helpers
def _dot_in_f32(weight: torch.Tensor) -> bool:
    # The interpreter gets bf16/fp16 tl.dot wrong: upcast there; fp32 weights use IEEE fp32 (no TF32),
    # as F.linear does with PyTorch's default allow_tf32=False.
    return interpreting() or weight.dtype == torch.float32


def _gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, p: int, dtype: torch.dtype) -> torch.Tensor:
    N, C, H, W, gh, gw = check_patch_grid(imgs, p, "patch_embed_gather")
    K = ids_keep.shape[1]
    P = p * p * C
    M = N * K
    out = new_empty((M, P), dtype, imgs.device)
    if M == 0:
        return out
    BLOCK_M = 64 if interpreting() else 16
    BLOCK_P = min(1024, triton.next_power_of_2(P))
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(P, BLOCK_P))
    _pe_gather_kernel[grid](
        imgs, ids_keep, out, M, K, P, gw,
        *imgs.stride(), *ids_keep.stride(),
        PS=p, C=C, BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P,
    )
    return out


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mae_fast::patch_embed_gather", mutates_args=())
def _patch_embed_gather_op(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    pos: torch.Tensor, patch_size: int,
) -> torch.Tensor:
    p = patch_size
    N, C, H, W, gh, gw = check_patch_grid(imgs, p, "patch_embed_gather")
    K = ids_keep.shape[1]
    D, P = weight.shape
    M = N * K
    out_dtype = torch.promote_types(weight.dtype, pos.dtype)
    out = new_empty((N, K, D), out_dtype, imgs.device)
    if M == 0:
        return out
    if interpreting():
        BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = 64, min(256, triton.next_power_of_2(D)), 128, 4, 1
    else:
        BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = 64, 128, 64, 4, 3
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(D, BLOCK_N))
    _pe_fwd_kernel[grid](
        imgs, ids_keep, weight, bias, pos, out,
        M, K, D, P, gw,
        *imgs.stride(), *ids_keep.stride(), *weight.stride(), bias.stride(0), *pos.stride(),
        PS=p, C=C, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_F32=_dot_in_f32(weight),
        num_warps=warps, num_stages=stages,
    )
    return out


@_patch_embed_gather_op.register_fake
def _(imgs, ids_keep, weight, bias, pos, patch_size):
    N, K = ids_keep.shape
    return imgs.new_empty((N, K, weight.shape[0]), dtype=torch.promote_types(weight.dtype, pos.dtype))


@torch.library.custom_op("mae_fast::patch_embed_gather_patches", mutates_args=())
def _gather_patches_op(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, dtype: torch.dtype) -> torch.Tensor:
    return _gather_patches(imgs, ids_keep, patch_size, dtype)


@_gather_patches_op.register_fake
def _(imgs, ids_keep, patch_size, dtype):
    N, K = ids_keep.shape
    return imgs.new_empty((N * K, patch_size * patch_size * imgs.shape[1]), dtype=dtype)


@torch.library.custom_op("mae_fast::patch_embed_scatter_grad", mutates_args=())
def _scatter_grad_op(grad_patches: torch.Tensor, ids_keep: torch.Tensor, imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    p = patch_size
    N, C, H, W, gh, gw = check_patch_grid(imgs, p, "patch_embed_gather")
    L = gh * gw
    K = ids_keep.shape[1]
    P = p * p * C
    grad = new_empty((N, C, H, W), imgs.dtype, imgs.device)
    slot = torch.full((N, L), -1, dtype=torch.int32, device=imgs.device)
    slot.scatter_(1, ids_keep, torch.arange(K, dtype=torch.int32, device=imgs.device).expand(N, K).contiguous())
    grad_patches = grad_patches.contiguous()
    BLOCK_M = 64 if interpreting() else 16
    BLOCK_P = min(1024, triton.next_power_of_2(P))
    grid = (triton.cdiv(N * L, BLOCK_M), triton.cdiv(P, BLOCK_P))
    _pe_scatter_kernel[grid](
        grad_patches, slot, grad, N * L, L, K, P, gw, *grad.stride(),
        PS=p, C=C, BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P,
    )
    return grad


@_scatter_grad_op.register_fake
def _(grad_patches, ids_keep, imgs, patch_size):
    return torch.empty_like(imgs, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    imgs, ids_keep, weight, bias, pos, patch_size = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.patch_size = patch_size
    ctx.bias_dtype = bias.dtype
    ctx.pos_shape = pos.shape
    ctx.pos_dtype = pos.dtype


def _backward(ctx, grad_out: torch.Tensor):
    imgs, ids_keep, weight = ctx.saved_tensors
    p = ctx.patch_size
    need_img, _, need_w, need_b, need_pos, _ = ctx.needs_input_grad
    D = weight.shape[0]
    g = grad_out.reshape(-1, D)
    gw = g.to(weight.dtype)
    grad_img = grad_w = grad_b = grad_pos = None
    if need_w:
        patches = _gather_patches_op(imgs, ids_keep, p, weight.dtype)
        grad_w = torch.mm(gw.t(), patches)
    if need_img:
        grad_patches = torch.mm(gw, weight)
        grad_img = _scatter_grad_op(grad_patches, ids_keep, imgs, p)
    if need_b:
        grad_b = g.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    if need_pos:
        grad_pos = torch.zeros(ctx.pos_shape, dtype=torch.float32, device=g.device)
        grad_pos.index_add_(0, ids_keep.reshape(-1), g.float())
        grad_pos = grad_pos.to(ctx.pos_dtype)
    return grad_img, None, grad_w, grad_b, grad_pos, None


_patch_embed_gather_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public
def patch_embed_gather(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    patch_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Embed only the kept patches: (N, C, H, W), ids_keep (N, K) -> (N, K, D) = linear(gathered
    patches, weight (D, p*p*C) in patchify order, bias) + pos_embed (L, D)[ids_keep].

    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch". Under autocast the GEMM
    runs in the autocast dtype like F.linear; the output dtype is promote(GEMM dtype, pos dtype).
    """
    dt = autocast_dtype(imgs.device.type)
    if dt is not None:
        weight, bias = weight.to(dt), bias.to(dt)
    if not use_triton(backend, (imgs, ids_keep, weight, bias, pos_embed), "patch_embed_gather"):
        return patch_embed_gather_reference(imgs, ids_keep, weight, bias, pos_embed, patch_size)
    # pixels are converted to the GEMM dtype on load: no cast pass over the image
    return _patch_embed_gather_op(imgs, ids_keep, weight, bias, pos_embed, patch_size)

"""Shuffle-gather masking fused around the patch-embed GEMM.

out[n, k] = W @ patch(imgs[n], ids_keep[n, k]) + b + pos[ids_keep[n, k]]       (N, K, D)

W is the conv weight (D, C, p, p) viewed as a (D, C*p*p) matrix: columns in the conv's own (c, py, px)
order (a free view, no permuted copy), so a patch is C*p rows of p contiguous pixels in the image.

Forward, two implementations, chosen per shape by timing once on CUDA (``backend_choices()``):
  "fused": one Triton kernel; each tile of output rows reads ``ids_keep``, loads the kept patches straight
     from the NCHW image (patchify + gather in the address computation, masked patches never read, no
     patch tensor written), runs the GEMM with ``tl.dot`` (float32 accumulation) and adds bias and the
     gathered position rows in the epilogue. The reduction runs over (c, py, px_pad): each pixel row is
     padded to a power of two (14 -> 16) so image loads are contiguous vectors and the weight rows are
     16-byte aligned; when p is not a power of two the weight is re-laid into that padded, zero-filled
     (D, KW) matrix (one small copy, fused with the autocast cast), else it is used as it is.
  "gemm": a Triton gather of the kept patches into (N*K, P), then cuBLAS ``addmm`` and the position add.
The output dtype is the GEMM (weight / autocast) dtype; bias and positions are added in float32 first.

Backward: the two big GEMMs are cuBLAS matmuls (``torch.mm``); Triton does the data movement around
them: one kernel re-gathers the kept patches (N*K, P) for the weight gradient, one kernel writes the
image gradient in NCHW layout straight from the (N*K, P) patch gradient (zeros at masked patches, every
pixel written once, no zero-fill pass and no atomics). Bias / pos gradients are torch reductions
(``pos`` is frozen in MAE pretraining; its index_add_ is not deterministic on CUDA).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ._utils import (autocast_dtype, check_patch_grid, choose_by_timing, interpreting, launch, new_empty,
                     patchify_reference, tl, triton, use_triton)

__all__ = ["patch_embed_gather", "patch_embed_gather_reference", "pe_fwd_config", "pe_move_config",
           "PATCH_EMBED_IMPLS"]

PATCH_EMBED_IMPLS = ("auto", "fused", "gemm")


# ----------------------------------------------------------------------------- reference
def patch_embed_gather_reference(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    pos_embed: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """Plain PyTorch: linear(gathered patches in (c, py, px) order, weight, bias) + pos_embed[ids_keep],
    in the weight's dtype (the official conv-then-gather, up to float rounding)."""
    N, C, H, W = imgs.shape
    p = patch_size
    x = imgs.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(N, -1, C * p * p)
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    x = F.linear(x.to(weight.dtype), weight, bias)
    return (x + pos_embed[ids_keep]).to(weight.dtype)


# ----------------------------------------------------------------------------- launch configurations
def _pad_px(p: int) -> int:
    """Pixels per patch row in the kernels' reduction index: p rounded up to a power of two."""
    return triton.next_power_of_2(p)


def pe_fwd_config(P: int, D: int, patch_size: int, C: int, dtype: torch.dtype) -> Dict[str, int]:
    """Tiles of the fused forward, used by the launch, the interpreter tests and
    ``mae_fast.bench.kernel_resources`` alike. bf16 / fp16 (sm_90 wgmma): 64x128x64, 4 warps, 3 stages,
    no spills at ViT-B/L/16 and H/14 (190 registers, 80 KiB shared: two programs per SM)."""
    if dtype == torch.float64:  # float64 dot and sums (twice the registers of fp32): smaller tiles still
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # IEEE fp32 tl.dot (no tensor cores): smaller tiles, more warps
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)


def pe_move_config(patch_size: int, C: int) -> Dict[str, int]:
    """Tiles of the patch gather / image-gradient scatter kernels (rows x padded pixel columns)."""
    return dict(BLOCK_M=32, BLOCK_Q=min(128, triton.next_power_of_2(C * patch_size * _pad_px(patch_size))),
                num_warps=4)


def _weight_width(P: int, patch_size: int, C: int, BLOCK_K: int) -> int:
    """Columns of the weight matrix the fused kernel reads: P when the plain view serves (p a power of
    two and P a multiple of BLOCK_K), else the padded (c, py, px_pad) width rounded up to BLOCK_K."""
    px = _pad_px(patch_size)
    if px == patch_size and P % BLOCK_K == 0:
        return P
    return triton.cdiv(C * patch_size * px, BLOCK_K) * BLOCK_K


def _kernel_weight(weight: torch.Tensor, patch_size: int, C: int, KW: int) -> torch.Tensor:
    """The (D, KW) weight the fused kernel reads: the view itself, or zero-padded rows of pixels."""
    D, P = weight.shape
    if KW == P:
        return weight
    px = _pad_px(patch_size)
    out = torch.zeros(D, KW, dtype=weight.dtype, device=weight.device)
    out[:, :C * patch_size * px].view(D, C * patch_size, px)[:, :, :patch_size].copy_(
        weight.view(D, C * patch_size, patch_size))
    return out


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _pe_fwd_kernel(
    img_ptr, ids_ptr, w_ptr, b_ptr, pos_ptr, out_ptr,
    M, K, D, KW, GW,
    s_in, s_ic, s_ih, s_iw,
    s_idn, s_idk,
    s_wd, s_wk,
    s_b,
    s_pl, s_pd,
    PS: tl.constexpr, C: tl.constexpr, PX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, ACC_F64: tl.constexpr,
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
    if ACC_F64:  # float64 weights: a float64 dot and sums
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KW, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # reduction index (c, py, px_pad); KW is a multiple of BLOCK_K
        prow_k = rk // PX  # c * PS + py
        px = rk % PX
        k_ok = prow_k < C * PS
        if PX != PS:
            k_ok = k_ok & (px < PS)
        col_off = (prow_k // PS) * s_ic + (prow_k % PS) * s_ih + px * s_iw
        a = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wd, mask=n_ok[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a.to(w.dtype), w)
    b = tl.load(b_ptr + rn * s_b, mask=n_ok, other=0.0).to(acc.dtype)
    pos = tl.load(pos_ptr + idx[:, None] * s_pl + rn[None, :] * s_pd, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    acc += b[None, :] + pos.to(acc.dtype)
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * D + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _pe_gather_kernel(
    img_ptr, ids_ptr, out_ptr,
    M, K, P, GW,
    s_in, s_ic, s_ih, s_iw,
    s_idn, s_idk,
    PS: tl.constexpr, C: tl.constexpr, PX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """out[m, :] = kept patch m in (c, py, px) order (cast to out dtype); q runs over (c, py, px_pad)."""
    pid_m = tl.program_id(0)
    pid_q = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n = rm // K
    idx = tl.load(ids_ptr + n.to(tl.int64) * s_idn + (rm % K) * s_idk, mask=m_ok, other=0)
    row_off = n.to(tl.int64) * s_in + ((idx // GW) * PS).to(tl.int64) * s_ih + ((idx % GW) * PS).to(tl.int64) * s_iw
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    prow_q = q // PX
    px = q % PX
    q_ok = (prow_q < C * PS) & (px < PS)
    col_off = (prow_q // PS) * s_ic + (prow_q % PS) * s_ih + px * s_iw
    ok = m_ok[:, None] & q_ok[None, :]
    v = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * P + (prow_q * PS + px)[None, :], v.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _pe_scatter_kernel(
    gp_ptr, slot_ptr, gimg_ptr,
    NL, L, K, P, GW,
    s_gn, s_gc, s_gh, s_gw,
    PS: tl.constexpr, C: tl.constexpr, PX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """grad_imgs at patch (n, l) = grad_patches[n*K + slot[n, l]] ((c, py, px) order), or 0 if slot < 0."""
    pid_m = tl.program_id(0)
    pid_q = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat patch index n * L + l
    m_ok = rm < NL
    n = rm // L
    l = rm % L
    slot = tl.load(slot_ptr + rm, mask=m_ok, other=-1)
    kept = slot >= 0
    src_row = n.to(tl.int64) * K + tl.maximum(slot, 0)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    prow_q = q // PX
    px = q % PX
    q_ok = (prow_q < C * PS) & (px < PS)
    g = tl.load(gp_ptr + src_row[:, None] * P + (prow_q * PS + px)[None, :],
                mask=(m_ok & kept)[:, None] & q_ok[None, :], other=0.0)
    row_off = n.to(tl.int64) * s_gn + ((l // GW) * PS).to(tl.int64) * s_gh + ((l % GW) * PS).to(tl.int64) * s_gw
    col_off = (prow_q // PS) * s_gc + (prow_q % PS) * s_gh + px * s_gw
    tl.store(gimg_ptr + row_off[:, None] + col_off[None, :], g.to(gimg_ptr.dtype.element_ty),
             mask=m_ok[:, None] & q_ok[None, :])


# ----------------------------------------------------------------------------- launch helpers
def _dot_in_f32(weight: torch.Tensor) -> bool:
    # The interpreter gets bf16/fp16 tl.dot wrong: upcast there; fp32 weights use IEEE fp32 (no TF32),
    # as F.linear does with PyTorch's default allow_tf32=False; fp64 weights a float64 dot.
    return weight.dtype == torch.float32 or (interpreting() and weight.dtype != torch.float64)


def _move_grid(rows: int, patch_size: int, C: int, cfg: Dict[str, int]) -> tuple:
    return (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(C * patch_size * _pad_px(patch_size), cfg["BLOCK_Q"]))


def _gather_patches(imgs: torch.Tensor, ids_keep: torch.Tensor, p: int, dtype: torch.dtype) -> torch.Tensor:
    N, C, H, W, gh, gw = check_patch_grid(imgs, p, "patch_embed_gather")
    K = ids_keep.shape[1]
    P = p * p * C
    M = N * K
    out = new_empty((M, P), dtype, imgs.device)
    if M == 0:
        return out
    cfg = pe_move_config(p, C)
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    launch(_pe_gather_kernel, _move_grid(M, p, C, cfg), dict(
        img_ptr=imgs, ids_ptr=ids_keep, out_ptr=out, M=M, K=K, P=P, GW=gw,
        **dict(zip(("s_in", "s_ic", "s_ih", "s_iw"), imgs.stride())),
        **dict(zip(("s_idn", "s_idk"), ids_keep.stride())),
        PS=p, C=C, PX=_pad_px(p), **blocks), dict(num_warps=cfg["num_warps"]))
    return out


def _forward_fused(imgs, ids_keep, weight, bias, pos, p: int) -> torch.Tensor:
    N, C, H, W, gh, gw = check_patch_grid(imgs, p, "patch_embed_gather")
    K = ids_keep.shape[1]
    D, P = weight.shape
    M = N * K
    out = new_empty((N, K, D), weight.dtype, imgs.device)
    if M == 0:
        return out
    cfg = pe_fwd_config(P, D, p, C, weight.dtype)
    KW = _weight_width(P, p, C, cfg["BLOCK_K"])
    w = _kernel_weight(weight, p, C, KW)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_N"]))
    launch(_pe_fwd_kernel, grid, dict(
        img_ptr=imgs, ids_ptr=ids_keep, w_ptr=w, b_ptr=bias, pos_ptr=pos, out_ptr=out,
        M=M, K=K, D=D, KW=KW, GW=gw,
        **dict(zip(("s_in", "s_ic", "s_ih", "s_iw"), imgs.stride())),
        **dict(zip(("s_idn", "s_idk"), ids_keep.stride())),
        s_wd=w.stride(0), s_wk=w.stride(1), s_b=bias.stride(0), s_pl=pos.stride(0), s_pd=pos.stride(1),
        PS=p, C=C, PX=_pad_px(p), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        DOT_F32=_dot_in_f32(weight), ACC_F64=weight.dtype == torch.float64),
        dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return out


def _forward_gemm(imgs, ids_keep, weight, bias, pos, p: int) -> torch.Tensor:
    """Triton gather of the kept patches, cuBLAS GEMM + bias, then the float32 position add."""
    N, K = ids_keep.shape
    patches = _gather_patches(imgs, ids_keep, p, weight.dtype)
    out = torch.addmm(bias, patches, weight.t()).view(N, K, -1)
    return out.add_(pos[ids_keep])  # computed in float32, rounded once to the weight dtype


_FORWARDS = {"fused": _forward_fused, "gemm": _forward_gemm}


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mae_fast::patch_embed_gather", mutates_args=())
def _patch_embed_gather_op(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    pos: torch.Tensor, patch_size: int, impl: str,
) -> torch.Tensor:
    if impl != "auto":
        return _FORWARDS[impl](imgs, ids_keep, weight, bias, pos, patch_size)
    N, K = ids_keep.shape
    D, P = weight.shape
    key = (f"N{N} K{K} D{D} P{P} p{patch_size} {tuple(imgs.shape[2:])} "
           f"{str(imgs.dtype)[6:]}->{str(weight.dtype)[6:]} on {imgs.device.type}")  # every rank's GPU: one key
    return choose_by_timing("patch_embed_gather", key, {
        name: (lambda f=f: f(imgs, ids_keep, weight, bias, pos, patch_size)) for name, f in _FORWARDS.items()
    }, imgs.device)


@_patch_embed_gather_op.register_fake
def _(imgs, ids_keep, weight, bias, pos, patch_size, impl):
    N, K = ids_keep.shape
    return imgs.new_empty((N, K, weight.shape[0]), dtype=weight.dtype)


@torch.library.custom_op("mae_fast::patch_embed_gather_patches", mutates_args=())
def _gather_patches_op(imgs: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, dtype: torch.dtype) -> torch.Tensor:
    return _gather_patches(imgs, ids_keep, patch_size, dtype)


@_gather_patches_op.register_fake
def _(imgs, ids_keep, patch_size, dtype):
    N, K = ids_keep.shape
    return imgs.new_empty((N * K, patch_size * patch_size * imgs.shape[1]), dtype=dtype)


def _scatter_grad(grad_patches: torch.Tensor, ids_keep: torch.Tensor, imgs: torch.Tensor, p: int) -> torch.Tensor:
    N, C, H, W, gh, gw = check_patch_grid(imgs, p, "patch_embed_gather")
    L = gh * gw
    K = ids_keep.shape[1]
    P = p * p * C
    grad = new_empty((N, C, H, W), imgs.dtype, imgs.device)
    if grad.numel() == 0:
        return grad
    slot = torch.full((N, L), -1, dtype=torch.int32, device=imgs.device)
    slot.scatter_(1, ids_keep, torch.arange(K, dtype=torch.int32, device=imgs.device).expand(N, K).contiguous())
    grad_patches = grad_patches.contiguous()
    cfg = pe_move_config(p, C)
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    launch(_pe_scatter_kernel, _move_grid(N * L, p, C, cfg), dict(
        gp_ptr=grad_patches, slot_ptr=slot, gimg_ptr=grad, NL=N * L, L=L, K=K, P=P, GW=gw,
        **dict(zip(("s_gn", "s_gc", "s_gh", "s_gw"), grad.stride())),
        PS=p, C=C, PX=_pad_px(p), **blocks), dict(num_warps=cfg["num_warps"]))
    return grad


@torch.library.custom_op("mae_fast::patch_embed_scatter_grad", mutates_args=())
def _scatter_grad_op(grad_patches: torch.Tensor, ids_keep: torch.Tensor, imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    return _scatter_grad(grad_patches, ids_keep, imgs, patch_size)


@_scatter_grad_op.register_fake
def _(grad_patches, ids_keep, imgs, patch_size):
    return torch.empty_like(imgs, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    imgs, ids_keep, weight, bias, pos, patch_size, impl = inputs
    ctx.save_for_backward(imgs, ids_keep, weight)
    ctx.patch_size = patch_size
    ctx.bias_dtype = bias.dtype
    ctx.pos_shape = pos.shape
    ctx.pos_dtype = pos.dtype


def _backward(ctx, grad_out: torch.Tensor):
    imgs, ids_keep, weight = ctx.saved_tensors
    p = ctx.patch_size
    need_img, _, need_w, need_b, need_pos, _, _ = ctx.needs_input_grad
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
    return grad_img, None, grad_w, grad_b, grad_pos, None, None


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
    impl: str = "auto",
) -> torch.Tensor:
    """Embed only the kept patches: (N, C, H, W), ids_keep (N, K) -> (N, K, D) = linear(gathered
    patches, weight (D, C*p*p) = the conv weight in its (c, py, px) order, bias) + pos_embed (L, D)[ids_keep].

    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch"; impl (Triton only):
    "fused", "gemm" or "auto" (timed once per shape on CUDA, see ``backend_choices()``). Under autocast
    the GEMM runs in the autocast dtype like F.linear; the output has the GEMM's dtype.
    """
    if impl not in PATCH_EMBED_IMPLS:
        raise ValueError(f"patch_embed_gather: impl must be one of {PATCH_EMBED_IMPLS}, got {impl!r}")
    dt = autocast_dtype(imgs.device.type)
    if dt is not None:
        weight, bias = weight.to(dt), bias.to(dt)
    if not use_triton(backend, (imgs, ids_keep, weight, bias, pos_embed), "patch_embed_gather"):
        return patch_embed_gather_reference(imgs, ids_keep, weight, bias, pos_embed, patch_size)
    D = weight.shape[0]
    P = imgs.shape[1] * patch_size * patch_size
    if weight.dim() != 2 or tuple(weight.shape) != (D, P) or bias.shape != (D,) or pos_embed.dim() != 2 \
            or pos_embed.shape[1] != D or ids_keep.dim() != 2 or ids_keep.shape[0] != imgs.shape[0]:
        raise ValueError(
            f"patch_embed_gather: shapes do not fit: imgs {tuple(imgs.shape)}, ids_keep {tuple(ids_keep.shape)}, "
            f"weight {tuple(weight.shape)} (want (D, {P})), bias {tuple(bias.shape)}, pos_embed "
            f"{tuple(pos_embed.shape)}, patch {patch_size}")
    # pixels are converted to the GEMM dtype on load: no cast pass over the image
    return _patch_embed_gather_op(imgs, ids_keep, weight, bias, pos_embed, patch_size, impl)

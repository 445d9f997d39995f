"""Masked (normalized-pixel) MSE loss of MAE, with the target patchified on the fly.

per_patch[n, l] = mean_P (pred[n, l] - target[n, l])^2,   target = patchify(imgs), or with
norm_pix_loss (t - mean) / sqrt(var_unbiased + 1e-6) per patch;   loss = sum(per_patch * mask) / sum(mask)

Forward (one Triton kernel): each program takes a block of patch rows, reads their pixels straight
from the NCHW image (no patchified target tensor), normalizes them in registers, reads the prediction
rows, and writes one float32 partial sum; partials are summed in a fixed order (deterministic) and
divided by sum(mask). Rows with mask 0 are skipped (neither pred nor pixels are read).
Backward (one Triton kernel): recomputes the target and writes grad_pred directly
(2 (pred - target) / P * mask / sum(mask) * grad_loss, zeros where mask is 0); grad_loss and sum(mask)
are read from device memory (no host sync).

Masked-only mode: pred (N, M, P) for the patches ids_masked (N, M) only (e.g. ids_shuffle[:, K:]),
so the model can skip the prediction head on visible tokens; row (n, i) is patch ids_masked[n, i].
Difference to the reference: a NaN/inf prediction at a patch with mask 0 does not propagate (the
reference multiplies it by 0 and gets NaN); with finite inputs the result is the same.
imgs and mask are treated as constants (no gradient), as in MAE where they are data.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._utils import check_patch_grid, interpreting, new_empty, patchify_reference, tl, triton, use_triton

__all__ = ["masked_loss", "masked_loss_reference"]

NORM_PIX_EPS = 1e-6


# ----------------------------------------------------------------------------- reference
def masked_loss_reference(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool,
    ids_masked: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Official forward_loss; with ids_masked, pred holds only those patches (rows gathered).
    Computed in float32 at least (float64 inputs stay float64)."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    target = patchify_reference(imgs, patch_size).to(dtype)
    weight = mask
    if ids_masked is not None:
        target = torch.gather(target, 1, ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        weight = torch.gather(mask, 1, ids_masked)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = (pred.to(dtype) - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * weight).sum() / mask.sum()


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _target_and_pred(
    pred_ptr, img_ptr, mask_ptr, ids_ptr,
    r, r_ok, LP, P, GW,
    s_pn, s_pl, s_pk,
    s_in, s_ic, s_ih, s_iw,
    s_mn, s_ml,
    s_idn, s_idi,
    PS: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """For rows r: (weight w, active rows, k in range, pred - target (float32, 0 outside))."""
    n = (r // LP).to(tl.int64)
    i = r % LP
    if HAS_IDS:
        l = tl.load(ids_ptr + n * s_idn + i * s_idi, mask=r_ok, other=0)
    else:
        l = i
    w = tl.load(mask_ptr + n * s_mn + l * s_ml, mask=r_ok, other=0).to(tl.float32)
    active = r_ok & (w != 0)
    k = tl.arange(0, BLOCK_P)
    k_ok = k < P
    ok = active[:, None] & k_ok[None, :]
    row_off = n * s_in + ((l // GW) * PS).to(tl.int64) * s_ih + ((l % GW) * PS).to(tl.int64) * s_iw
    col_off = (k % C) * s_ic + (k // (PS * C)) * s_ih + ((k // C) % PS) * s_iw
    t = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=ok, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(t, axis=1) / P
        diff = tl.where(k_ok[None, :], t - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / (P - 1)
        t = diff / tl.sqrt_rn(var + 1e-6)[:, None]
    p = tl.load(pred_ptr + n[:, None] * s_pn + i[:, None] * s_pl + k[None, :] * s_pk, mask=ok, other=0.0)
    e = tl.where(ok, p.to(tl.float32) - t, 0.0)
    return w, active, k, k_ok, e


@triton.jit
def _loss_fwd_kernel(
    pred_ptr, img_ptr, mask_ptr, ids_ptr, part_ptr,
    R, LP, P, GW,
    s_pn, s_pl, s_pk,
    s_in, s_ic, s_ih, s_iw,
    s_mn, s_ml,
    s_idn, s_idi,
    PS: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    w, active, k, k_ok, e = _target_and_pred(
        pred_ptr, img_ptr, mask_ptr, ids_ptr, r, r_ok, LP, P, GW,
        s_pn, s_pl, s_pk, s_in, s_ic, s_ih, s_iw, s_mn, s_ml, s_idn, s_idi,
        PS, C, NORM, HAS_IDS, BLOCK_P,
    )
    per_patch = tl.sum(e * e, axis=1) / P
    tl.store(part_ptr + pid, tl.sum(tl.where(active, per_patch * w, 0.0), axis=0))


@triton.jit
def _loss_bwd_kernel(
    pred_ptr, img_ptr, mask_ptr, ids_ptr, scale_ptr, grad_ptr,
    R, LP, P, GW,
    s_pn, s_pl, s_pk,
    s_in, s_ic, s_ih, s_iw,
    s_mn, s_ml,
    s_idn, s_idi,
    PS: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    w, active, k, k_ok, e = _target_and_pred(
        pred_ptr, img_ptr, mask_ptr, ids_ptr, r, r_ok, LP, P, GW,
        s_pn, s_pl, s_pk, s_in, s_ic, s_ih, s_iw, s_mn, s_ml, s_idn, s_idi,
        PS, C, NORM, HAS_IDS, BLOCK_P,
    )
    scale = tl.load(scale_ptr)  # grad_loss / sum(mask)
    g = e * (2.0 / P) * (w * scale)[:, None]
    g = tl.where(active[:, None], g, 0.0)
    tl.store(grad_ptr + r.to(tl.int64)[:, None] * P + k[None, :], g.to(grad_ptr.dtype.element_ty),
             mask=r_ok[:, None] & k_ok[None, :])


def _launch(kernel, pred, imgs, mask, ids, extra, out, patch_size, norm):
    p = patch_size
    N, C, H, W, gh, gw = check_patch_grid(imgs, p, "masked_loss")
    _, LP, P = pred.shape
    R = N * LP
    BLOCK_P = triton.next_power_of_2(P)
    BLOCK_R = max(1, min(64, 65536 // BLOCK_P)) if interpreting() else max(1, min(8, 4096 // BLOCK_P))
    has_ids = ids is not None
    ids_t = ids if has_ids else mask  # dummy pointer, never read
    grid = (triton.cdiv(R, BLOCK_R),)
    kernel[grid](
        pred, imgs, mask, ids_t, *extra, out,
        R, LP, P, gw,
        *pred.stride(), *imgs.stride(), *mask.stride(), *(ids_t.stride() if has_ids else (0, 0)),
        PS=p, C=C, NORM=norm, HAS_IDS=has_ids, BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P,
        num_warps=4 if BLOCK_P <= 1024 else 8,
    )


def _num_programs(pred: torch.Tensor) -> int:
    N, LP, P = pred.shape
    BLOCK_P = triton.next_power_of_2(P)
    BLOCK_R = max(1, min(64, 65536 // BLOCK_P)) if interpreting() else max(1, min(8, 4096 // BLOCK_P))
    return triton.cdiv(N * LP, BLOCK_R)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("mae_fast::masked_loss", mutates_args=())
def _masked_loss_op(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, ids_masked: Optional[torch.Tensor],
    patch_size: int, norm_pix_loss: bool,
) -> torch.Tensor:
    part = new_empty((_num_programs(pred),), torch.float32, pred.device)
    if part.numel():
        _launch(_loss_fwd_kernel, pred, imgs, mask, ids_masked, (), part, patch_size, norm_pix_loss)
    return part.sum() / mask.sum(dtype=torch.float32)


@_masked_loss_op.register_fake
def _(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mae_fast::masked_loss_backward", mutates_args=())
def _masked_loss_bwd_op(
    grad_loss: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
    ids_masked: Optional[torch.Tensor], patch_size: int, norm_pix_loss: bool,
) -> torch.Tensor:
    grad = new_empty(pred.shape, pred.dtype, pred.device)
    if grad.numel():
        scale = (grad_loss.float() / mask.sum(dtype=torch.float32)).reshape(1)
        _launch(_loss_bwd_kernel, pred, imgs, mask, ids_masked, (scale,), grad, patch_size, norm_pix_loss)
    return grad


@_masked_loss_bwd_op.register_fake
def _(grad_loss, pred, imgs, mask, ids_masked, patch_size, norm_pix_loss):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    pred, imgs, mask, ids_masked, patch_size, norm_pix_loss = inputs
    ctx.save_for_backward(pred, imgs, mask, ids_masked)
    ctx.patch_size, ctx.norm = patch_size, norm_pix_loss


def _backward(ctx, grad_loss: torch.Tensor):
    pred, imgs, mask, ids_masked = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _masked_loss_bwd_op(grad_loss, pred, imgs, mask, ids_masked, ctx.patch_size, ctx.norm)
    return grad, None, None, None, None, None


_masked_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public
def masked_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool,
    ids_masked: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """MAE loss: pred (N, L, P) (or (N, M, P) for the patches ids_masked (N, M)), imgs (N, C, H, W),
    mask (N, L) with 1 = removed -> float32 scalar sum(per-patch MSE * mask) / sum(mask).

    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
    """
    tensors = (pred, imgs, mask) + ((ids_masked,) if ids_masked is not None else ())
    if not use_triton(backend, tensors, "masked_loss"):
        return masked_loss_reference(pred, imgs, mask, patch_size, norm_pix_loss, ids_masked)
    N, C, H, W, gh, gw = check_patch_grid(imgs, patch_size, "masked_loss")
    P = patch_size * patch_size * C
    rows = ids_masked.shape[1] if ids_masked is not None else gh * gw
    if pred.dim() != 3 or tuple(pred.shape) != (N, rows, P) or tuple(mask.shape) != (N, gh * gw):
        raise ValueError(
            f"masked_loss: shapes do not fit: pred {tuple(pred.shape)} (want {(N, rows, P)}), imgs "
            f"{tuple(imgs.shape)}, mask {tuple(mask.shape)} (want {(N, gh * gw)}), patch {patch_size}"
        )
    if imgs.requires_grad or mask.requires_grad:
        raise NotImplementedError("masked_loss: the Triton path gives no gradient for imgs or mask; detach them")
    if not mask.is_floating_point():
        mask = mask.to(torch.float32)
    return _masked_loss_op(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss)

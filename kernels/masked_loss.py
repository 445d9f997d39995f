"""Masked (normalized-pixel) MSE loss of MAE, with the target patchified on the fly.

per_patch[n, l] = mean_P (pred[n, l] - target[n, l])^2,   target = patchify(imgs), or with
norm_pix_loss (t - mean) / sqrt(var_unbiased + 1e-6) per patch;   loss = sum(per_patch * mask) / sum(mask)

Forward (one Triton kernel): each program takes a block of patch rows, reads their pixels straight
from the NCHW image (no patchified target tensor), normalizes them in registers (two-pass mean and
variance; a row of P values is held as a power-of-two main part plus a power-of-two tail, 588 = 512 +
76 of 128, so few lanes idle: ``loss_config``), reads the prediction rows, and writes one float32
partial sum; partials are summed in a fixed order (deterministic) and
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

from typing import Dict, Optional

import torch

from ._utils import check_patch_grid, launch, new_empty, patchify_reference, tl, triton, use_triton

__all__ = ["masked_loss", "masked_loss_reference", "loss_config"]

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


# ----------------------------------------------------------------------------- launch configuration
def loss_config(P: int) -> Dict[str, int]:
    """Tiles of both loss kernels: a patch row of P values is held as a power-of-two main part plus a
    power-of-two tail (588 = 512 + 128, 768 = 512 + 256), so few lanes idle; used by the launch, the
    interpreter tests and ``mae_fast.bench.kernel_resources`` alike."""
    main = 1 << (max(P, 1).bit_length() - 1)
    tail = triton.next_power_of_2(P - main) if P > main else 0
    rows = max(1, min(16, 4096 // (main + tail)))
    return dict(BLOCK_R=1 << (rows.bit_length() - 1), BLOCK_A=main, BLOCK_B=tail, num_warps=4)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _load_part(
    pred_ptr, img_ptr, n, i, l, active, k0, P, GW,
    s_pn, s_pl, s_pk, s_in, s_ic, s_ih, s_iw,
    PS: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr,
):
    """Columns k0 .. k0+BLOCK of the rows: (k, in range, target pixels, predictions), both float32."""
    k = k0 + tl.arange(0, BLOCK)
    k_ok = k < P
    ok = active[:, None] & k_ok[None, :]
    row_off = n * s_in + ((l // GW) * PS).to(tl.int64) * s_ih + ((l % GW) * PS).to(tl.int64) * s_iw
    col_off = (k % C) * s_ic + (k // (PS * C)) * s_ih + ((k // C) % PS) * s_iw
    t = tl.load(img_ptr + row_off[:, None] + col_off[None, :], mask=ok, other=0.0).to(tl.float32)
    p = tl.load(pred_ptr + n[:, None] * s_pn + i[:, None] * s_pl + k[None, :] * s_pk, mask=ok, other=0.0)
    return k, k_ok, t, p.to(tl.float32)


@triton.jit
def _errors(
    pred_ptr, img_ptr, mask_ptr, ids_ptr,
    r, r_ok, LP, P, GW,
    s_pn, s_pl, s_pk,
    s_in, s_ic, s_ih, s_iw,
    s_mn, s_ml,
    s_idn, s_idi,
    PS: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """For rows r: weight w, active rows, and pred - target (float32, 0 outside) for the main part
    (columns k_a) and the tail (k_b; a one-column dummy when BLOCK_B is 0)."""
    n = (r // LP).to(tl.int64)
    i = r % LP
    if HAS_IDS:
        l = tl.load(ids_ptr + n * s_idn + i * s_idi, mask=r_ok, other=0)
    else:
        l = i
    w = tl.load(mask_ptr + n * s_mn + l * s_ml, mask=r_ok, other=0).to(tl.float32)
    active = r_ok & (w != 0)
    k_a, ok_a, t_a, p_a = _load_part(pred_ptr, img_ptr, n, i, l, active, 0, P, GW,
                                     s_pn, s_pl, s_pk, s_in, s_ic, s_ih, s_iw, PS, C, BLOCK_A)
    if BLOCK_B > 0:
        k_b, ok_b, t_b, p_b = _load_part(pred_ptr, img_ptr, n, i, l, active, BLOCK_A, P, GW,
                                         s_pn, s_pl, s_pk, s_in, s_ic, s_ih, s_iw, PS, C, BLOCK_B)
    else:
        k_b, ok_b, t_b, p_b = _load_part(pred_ptr, img_ptr, n, i, l, active & False, P, P, GW,
                                         s_pn, s_pl, s_pk, s_in, s_ic, s_ih, s_iw, PS, C, 1)
    if NORM:  # two-pass mean / unbiased variance over the whole row (both parts held in registers)
        mean = (tl.sum(t_a, axis=1) + tl.sum(t_b, axis=1)) / P
        d_a = tl.where(ok_a[None, :], t_a - mean[:, None], 0.0)
        d_b = tl.where(ok_b[None, :], t_b - mean[:, None], 0.0)
        var = (tl.sum(d_a * d_a, axis=1) + tl.sum(d_b * d_b, axis=1)) / (P - 1)
        std = tl.sqrt_rn(var + 1e-6)
        t_a = d_a / std[:, None]
        t_b = d_b / std[:, None]
    e_a = tl.where(active[:, None] & ok_a[None, :], p_a - t_a, 0.0)
    e_b = tl.where(active[:, None] & ok_b[None, :], p_b - t_b, 0.0)
    return w, active, k_a, ok_a, e_a, k_b, ok_b, e_b


@triton.jit
def _loss_fwd_kernel(
    pred_ptr, img_ptr, mask_ptr, ids_ptr, part_ptr,
    R, LP, P, GW,
    s_pn, s_pl, s_pk,
    s_in, s_ic, s_ih, s_iw,
    s_mn, s_ml,
    s_idn, s_idi,
    PS: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr, HAS_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    w, active, k_a, ok_a, e_a, k_b, ok_b, e_b = _errors(
        pred_ptr, img_ptr, mask_ptr, ids_ptr, r, r_ok, LP, P, GW,
        s_pn, s_pl, s_pk, s_in, s_ic, s_ih, s_iw, s_mn, s_ml, s_idn, s_idi,
        PS, C, NORM, HAS_IDS, BLOCK_A, BLOCK_B,
    )
    per_patch = (tl.sum(e_a * e_a, axis=1) + tl.sum(e_b * e_b, axis=1)) / P
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
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    w, active, k_a, ok_a, e_a, k_b, ok_b, e_b = _errors(
        pred_ptr, img_ptr, mask_ptr, ids_ptr, r, r_ok, LP, P, GW,
        s_pn, s_pl, s_pk, s_in, s_ic, s_ih, s_iw, s_mn, s_ml, s_idn, s_idi,
        PS, C, NORM, HAS_IDS, BLOCK_A, BLOCK_B,
    )
    scale = tl.load(scale_ptr)  # grad_loss / sum(mask)
    f = tl.where(active, w * scale * (2.0 / P), 0.0)
    rows = r.to(tl.int64)[:, None] * P
    tl.store(grad_ptr + rows + k_a[None, :], (e_a * f[:, None]).to(grad_ptr.dtype.element_ty),
             mask=r_ok[:, None] & ok_a[None, :])
    if BLOCK_B > 0:
        tl.store(grad_ptr + rows + k_b[None, :], (e_b * f[:, None]).to(grad_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & ok_b[None, :])


def _launch(kernel, pred, imgs, mask, ids, extra: dict, out, patch_size, norm):
    p = patch_size
    N, C, H, W, gh, gw = check_patch_grid(imgs, p, "masked_loss")
    _, LP, P = pred.shape
    cfg = loss_config(P)
    has_ids = ids is not None
    ids_t = ids if has_ids else mask  # dummy pointer, never read
    out_name = "part_ptr" if kernel is _loss_fwd_kernel else "grad_ptr"
    launch(kernel, (triton.cdiv(N * LP, cfg["BLOCK_R"]),), dict(
        pred_ptr=pred, img_ptr=imgs, mask_ptr=mask, ids_ptr=ids_t, **extra, **{out_name: out},
        R=N * LP, LP=LP, P=P, GW=gw,
        **dict(zip(("s_pn", "s_pl", "s_pk"), pred.stride())),
        **dict(zip(("s_in", "s_ic", "s_ih", "s_iw"), imgs.stride())),
        **dict(zip(("s_mn", "s_ml"), mask.stride())),
        **dict(zip(("s_idn", "s_idi"), ids_t.stride() if has_ids else (0, 0))),
        PS=p, C=C, NORM=norm, HAS_IDS=has_ids,
        BLOCK_R=cfg["BLOCK_R"], BLOCK_A=cfg["BLOCK_A"], BLOCK_B=cfg["BLOCK_B"]), dict(num_warps=cfg["num_warps"]))


def _num_programs(pred: torch.Tensor) -> int:
    N, LP, P = pred.shape
    return triton.cdiv(N * LP, loss_config(P)["BLOCK_R"])


# ----------------------------------------------------------------------------- custom ops
def _forward(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, ids_masked: Optional[torch.Tensor],
             patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    part = new_empty((_num_programs(pred),), torch.float32, pred.device)
    if part.numel():
        _launch(_loss_fwd_kernel, pred, imgs, mask, ids_masked, {}, part, patch_size, norm_pix_loss)
    return part.sum() / mask.sum(dtype=torch.float32)


def _backward_kernel(grad_loss: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                     ids_masked: Optional[torch.Tensor], patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    grad = new_empty(pred.shape, pred.dtype, pred.device)
    if grad.numel():
        scale = (grad_loss.float() / mask.sum(dtype=torch.float32)).reshape(1)
        _launch(_loss_bwd_kernel, pred, imgs, mask, ids_masked, dict(scale_ptr=scale), grad, patch_size,
                norm_pix_loss)
    return grad


@torch.library.custom_op("mae_fast::masked_loss", mutates_args=())
def _masked_loss_op(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, ids_masked: Optional[torch.Tensor],
    patch_size: int, norm_pix_loss: bool,
) -> torch.Tensor:
    return _forward(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss)


@_masked_loss_op.register_fake
def _(pred, imgs, mask, ids_masked, patch_size, norm_pix_loss):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("mae_fast::masked_loss_backward", mutates_args=())
def _masked_loss_bwd_op(
    grad_loss: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
    ids_masked: Optional[torch.Tensor], patch_size: int, norm_pix_loss: bool,
) -> torch.Tensor:
    return _backward_kernel(grad_loss, pred, imgs, mask, ids_masked, patch_size, norm_pix_loss)


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

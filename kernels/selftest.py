"""A quick check, on the device at hand, that each Triton op matches its PyTorch reference.

Run once before training (``MaskedAutoencoderViT.check_kernels``), in the dtype the run computes in
(bf16 / fp16 under autocast, fp32 or fp64 without: each is another compiled kernel, the fused patch
embedding even other tiles): if an op fails to build, launch or agree on this GPU, the model falls back
to the references with a warning naming the op, so a run never depends on an unverified kernel.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ._utils import Masking, masking_reference
from .masked_loss import masked_loss
from .patch_embed_gather import patch_embed_gather
from .unshuffle import unshuffle_mask_tokens

MASK_RATIO = 0.75  # 4 of the 16 patches kept


def _masking(N: int, L: int, g: torch.Generator, device: torch.device) -> Masking:
    """The official random masking of noise drawn on the CPU from ``g``, moved to ``device`` (ids_keep contiguous)."""
    m = masking_reference(torch.rand(N, L, generator=g), MASK_RATIO)
    return Masking(m.ids_shuffle.to(device), m.ids_restore.to(device), m.ids_keep.contiguous().to(device),
                   m.mask.to(device))


def _compare(run: Callable[[str], tuple], tol: float) -> None:
    """Outputs and gradients of ``run("triton")`` equal ``run("torch")``: relative L2 error <= ``tol``
    (an element-wise test would trip on bf16 rounding of large GEMM sums)."""
    got, ref = run("triton"), run("torch")
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape:
            raise AssertionError(f"output {i} has shape {tuple(a.shape)}, the reference {tuple(b.shape)}")
        a, b = a.double(), b.double()
        err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
        if not err <= tol:  # also catches NaN
            raise AssertionError(f"output {i} differs from the reference (relative L2 error {err:.3g} > {tol})")


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The parameters' (and images') dtype in a run computing in ``dtype``: fp32 under bf16 / fp16 autocast."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _tol(dtype: torch.dtype, half: float) -> float:
    """Relative L2 tolerance: bf16 / fp16 rounding, or (fp32 / fp64) room for a TF32 reference GEMM; a wrong
    kernel is off by O(1)."""
    return half if dtype in (torch.bfloat16, torch.float16) else 5e-3


def _check_patch_embed_gather(device: torch.device, g: torch.Generator, p: int, D: int, Dd: int,
                              dtype: torch.dtype) -> None:
    N, pd = 2, _param_dtype(dtype)
    imgs = torch.randn(N, 3, 4 * p, 4 * p, generator=g).to(device, pd)
    ids_keep = _masking(N, 16, g, device).ids_keep
    w0 = (torch.randn(D, 3 * p * p, generator=g) * 0.02).to(device, pd)
    b0 = torch.randn(D, generator=g).to(device, pd)
    pos = torch.randn(16, D, generator=g).to(device, pd)
    gout = torch.randn(N, 4, D, generator=g).to(device, pd)

    def run(backend: str, impl: str):
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != pd):
            out = patch_embed_gather(imgs, ids_keep, w, b, pos, p, backend=backend, impl=impl)
        out.to(pd).backward(gout)
        return out, w.grad, b.grad

    for impl in ("fused", "gemm"):  # "auto" may time its way to either
        _compare(lambda backend: run(backend, impl), tol=_tol(dtype, 2e-2))


def _check_unshuffle(device: torch.device, g: torch.Generator, p: int, D: int, Dd: int, dtype: torch.dtype) -> None:
    N, L, keep, pd = 2, 16, 4, _param_dtype(dtype)
    x0 = torch.randn(N, 1 + keep, Dd, generator=g).to(device, dtype)  # the decoder embedding's output
    mt0 = torch.randn(1, 1, Dd, generator=g).to(device, pd)
    pos = torch.randn(1, 1 + L, Dd, generator=g).to(device, pd)
    ids_restore = _masking(N, L, g, device).ids_restore
    gout = torch.randn(N, 1 + L, Dd, generator=g).to(device)

    def run(backend: str):
        x, mt = x0.clone().requires_grad_(True), mt0.clone().requires_grad_(True)
        out = unshuffle_mask_tokens(x, mt, ids_restore, pos, backend=backend)
        out.backward(gout.to(out.dtype))
        return out, x.grad, mt.grad

    _compare(run, tol=_tol(dtype, 1e-2))


def _check_masked_loss(device: torch.device, g: torch.Generator, p: int, D: int, Dd: int, dtype: torch.dtype) -> None:
    N = 2
    imgs = torch.randn(N, 3, 4 * p, 4 * p, generator=g).to(device, _param_dtype(dtype))
    mask = _masking(N, 16, g, device).mask
    pred0 = torch.randn(N, 16, 3 * p * p, generator=g).to(device, dtype)  # the decoder head's output

    def run(backend: str):
        pred = pred0.clone().requires_grad_(True)
        loss = masked_loss(pred, imgs, mask, p, True, backend=backend)
        loss.backward()
        return loss, pred.grad

    _compare(run, tol=_tol(dtype, 1e-2))  # the gradient has pred's dtype


CHECKS: Dict[str, Callable[[torch.device, torch.Generator, int, int, int, torch.dtype], None]] = {
    "patch_embed_gather": _check_patch_embed_gather,
    "unshuffle_mask_tokens": _check_unshuffle,
    "masked_loss": _check_masked_loss,
}


_RESULTS: Dict[tuple, Dict[str, Optional[str]]] = {}


def selftest(device: torch.device, patch_size: int = 16, embed_dim: int = 80, decoder_dim: int = 48,
             dtype: torch.dtype = torch.bfloat16) -> Dict[str, Optional[str]]:
    """{op: None if its Triton kernels match the reference on ``device``, else why not}, on a 4x4-patch
    image with the model's patch size and widths, computing in ``dtype`` (the run's: bf16 / fp16 autocast,
    else fp32 / fp64); cached per (device, shape, dtype)."""
    key = (str(torch.device(device)), patch_size, embed_dim, decoder_dim, dtype)
    if key not in _RESULTS:
        _RESULTS[key] = _run_checks(torch.device(device), patch_size, embed_dim, decoder_dim, dtype)
    return _RESULTS[key]


def _run_checks(device: torch.device, patch_size: int = 16, embed_dim: int = 80, decoder_dim: int = 48,
                dtype: torch.dtype = torch.bfloat16) -> Dict[str, Optional[str]]:
    g = torch.Generator().manual_seed(0)
    results: Dict[str, Optional[str]] = {}
    for name, check in CHECKS.items():
        try:
            check(device, g, patch_size, embed_dim, decoder_dim, dtype)
            results[name] = None
        except Exception as e:  # any failure (build, launch, mismatch) means: do not use this kernel
            msg = str(e).strip().splitlines()
            results[name] = f"{type(e).__name__}: {msg[0] if msg else ''}"
    return results

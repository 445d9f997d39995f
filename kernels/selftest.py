"""A quick check, on the device at hand, that each Triton op matches its PyTorch reference.

Run once before training (``MaskedAutoencoderViT.check_kernels``): if an op fails to build, launch
or agree on this GPU, the model falls back to the references with a warning naming the op, so a
run never depends on an unverified kernel.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .masked_loss import masked_loss
from .patch_embed_gather import patch_embed_gather
from .unshuffle import unshuffle_mask_tokens


def _masking(N: int, L: int, keep: int, g: torch.Generator, device: torch.device):
    ids_shuffle = torch.argsort(torch.rand(N, L, generator=g), dim=1).to(device)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= keep).float()
    return ids_shuffle[:, :keep].contiguous(), ids_restore, mask


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


def _check_patch_embed_gather(device: torch.device, g: torch.Generator, p: int, D: int, Dd: int) -> None:
    N = 2
    imgs = torch.randn(N, 3, 4 * p, 4 * p, generator=g).to(device)
    ids_keep, _, _ = _masking(N, 16, 4, g, device)
    w0 = (torch.randn(D, 3 * p * p, generator=g) * 0.02).to(device)
    b0 = torch.randn(D, generator=g).to(device)
    pos = torch.randn(16, D, generator=g).to(device)
    gout = torch.randn(N, 4, D, generator=g).to(device)

    def run(backend: str, impl: str):
        w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = patch_embed_gather(imgs, ids_keep, w, b, pos, p, backend=backend, impl=impl)
        out.float().backward(gout)
        return out, w.grad, b.grad

    for impl in ("fused", "gemm"):  # "auto" may time its way to either
        _compare(lambda backend: run(backend, impl), tol=2e-2)


def _check_unshuffle(device: torch.device, g: torch.Generator, p: int, D: int, Dd: int) -> None:
    N, L, keep = 2, 16, 4
    x0 = torch.randn(N, 1 + keep, Dd, generator=g).to(device, torch.bfloat16)
    mt0 = torch.randn(1, 1, Dd, generator=g).to(device)
    pos = torch.randn(1, 1 + L, Dd, generator=g).to(device)
    _, ids_restore, _ = _masking(N, L, keep, g, device)
    gout = torch.randn(N, 1 + L, Dd, generator=g).to(device)

    def run(backend: str):
        x, mt = x0.clone().requires_grad_(True), mt0.clone().requires_grad_(True)
        out = unshuffle_mask_tokens(x, mt, ids_restore, pos, backend=backend)
        out.backward(gout.to(out.dtype))
        return out, x.grad, mt.grad

    _compare(run, tol=1e-2)


def _check_masked_loss(device: torch.device, g: torch.Generator, p: int, D: int, Dd: int) -> None:
    N = 2
    imgs = torch.randn(N, 3, 4 * p, 4 * p, generator=g).to(device)
    _, _, mask = _masking(N, 16, 4, g, device)
    pred0 = torch.randn(N, 16, 3 * p * p, generator=g).to(device, torch.bfloat16)

    def run(backend: str):
        pred = pred0.clone().requires_grad_(True)
        loss = masked_loss(pred, imgs, mask, p, True, backend=backend)
        loss.backward()
        return loss, pred.grad

    _compare(run, tol=1e-2)  # the gradient is bf16, like pred


CHECKS: Dict[str, Callable[[torch.device, torch.Generator, int, int, int], None]] = {
    "patch_embed_gather": _check_patch_embed_gather,
    "unshuffle_mask_tokens": _check_unshuffle,
    "masked_loss": _check_masked_loss,
}


_RESULTS: Dict[tuple, Dict[str, Optional[str]]] = {}


def selftest(device: torch.device, patch_size: int = 16, embed_dim: int = 80, decoder_dim: int = 48
             ) -> Dict[str, Optional[str]]:
    """{op: None if its Triton kernels match the reference on ``device``, else why not}, on a 4x4-patch
    image with the model's patch size and widths; cached per (device, shape)."""
    key = (str(torch.device(device)), patch_size, embed_dim, decoder_dim)
    if key not in _RESULTS:
        _RESULTS[key] = _run_checks(torch.device(device), patch_size, embed_dim, decoder_dim)
    return _RESULTS[key]


def _run_checks(device: torch.device, patch_size: int = 16, embed_dim: int = 80, decoder_dim: int = 48
                ) -> Dict[str, Optional[str]]:
    g = torch.Generator().manual_seed(0)
    results: Dict[str, Optional[str]] = {}
    for name, check in CHECKS.items():
        try:
            check(device, g, patch_size, embed_dim, decoder_dim)
            results[name] = None
        except Exception as e:  # any failure (build, launch, mismatch) means: do not use this kernel
            msg = str(e).strip().splitlines()
            results[name] = f"{type(e).__name__}: {msg[0] if msg else ''}"
    return results

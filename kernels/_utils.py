"""Small helpers shared by the Triton ops: backend choice, interpreter detection, NaN poisoning."""
from __future__ import annotations

import os
from typing import Sequence

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False

    class _TritonStub:
        """Lets the kernel modules import (``@triton.jit``, ``tl.constexpr``) without Triton."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (int(n) - 1).bit_length())

    triton = tl = _TritonStub()  # type: ignore[assignment]

BACKENDS = ("auto", "triton", "torch")
POISON_ENV = "MAE_FAST_KERNELS_POISON"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(backend: str, tensors: Sequence[torch.Tensor], op: str) -> bool:
    """Resolve ``backend`` ("auto" | "triton" | "torch") for tensors on one device."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{op}: backend='triton' got tensors on {devices}; Triton runs on CUDA tensors, or on CPU "
            "tensors only under the interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    return True


def autocast_dtype(device_type: str) -> "torch.dtype | None":
    """The active autocast dtype for ``device_type``, or None (also for devices autocast does not
    know, such as meta)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def new_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor when ``MAE_FAST_KERNELS_POISON=1`` (tests: catches
    any element a kernel forgets to write)."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def patchify_reference(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C): patches row-major, (py, px, c) inside a patch (official)."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def check_patch_grid(imgs: torch.Tensor, p: int, op: str) -> tuple:
    """Validate (N, C, H, W) with H, W multiples of p; returns (N, C, H, W, grid_h, grid_w)."""
    if imgs.dim() != 4:
        raise ValueError(f"{op}: imgs must be (N, C, H, W), got shape {tuple(imgs.shape)}")
    N, C, H, W = imgs.shape
    if p <= 0 or H % p or W % p:
        raise ValueError(f"{op}: image size {H}x{W} is not a multiple of the patch size {p}")
    return N, C, H, W, H // p, W // p


def compile_for_gpu(kernel, arg_types: dict, constexprs: dict, options: dict | None = None, arch: int = 90):
    """Compile a ``@triton.jit`` kernel ahead of time to a CUDA binary (default sm_90, H100) with no
    GPU present: catches GPU-only errors that the interpreter cannot (tl.dot dtypes, layouts, ptxas).

    arg_types maps pointer / non-default argument names to Triton type strings ("*bf16", "i64");
    other non-constexpr arguments are "i32". Must run without ``TRITON_INTERPRET=1``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("compile_for_gpu cannot run under TRITON_INTERPRET=1")
    names = kernel.arg_names
    signature = {a: "constexpr" if a in constexprs else arg_types.get(a, "i32") for a in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options or {}))

"""Helpers shared by the kernel tests."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def compile_for_h100(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter without TRITON_INTERPRET: the real (GPU) code path. It sees
    ``torch``, ``importlib``, ``compile_launch`` and ``recording_launches`` (drive an op's launch code on
    meta tensors with ``execute=False``, then build each recorded launch for sm_90)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = ("import importlib\nimport torch\n"
               "from mae_fast.kernels._utils import compile_launch, recording_launches\n")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=600)


def close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    """Max abs error of ``a`` against ``b`` within ``tol`` x max|b| (+1e-6); ``a`` must be finite (outputs
    are NaN-poisoned before the call, so an unwritten element fails here)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = b.double().abs().max().item() if b.numel() else 0.0
    assert err <= tol * scale + 1e-6, f"{what}: max error {err:.3g} vs scale {scale:.3g}"

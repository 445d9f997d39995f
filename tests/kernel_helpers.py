"""Helpers shared by the kernel tests."""
import os
import subprocess
import sys
import textwrap

import pytest


def compile_for_h100(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter without TRITON_INTERPRET: the real (GPU) code path."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = "import importlib\nfrom mae_fast.kernels._utils import compile_for_gpu\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], env=env,
                          capture_output=True, text=True, timeout=600)

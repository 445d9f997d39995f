"""Shared test helpers: small models and fresh random inputs (never zeros)."""
import importlib.util
import os
import socket

# Kernel tests (tests/test_kernel_*.py) run the Triton kernels in the CPU interpreter on machines
# without an NVIDIA GPU; this must be set before triton is first imported in the pytest process.
if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest
import torch

from mae_fast import mae_vit_tiny_patch8

#: tar shards need webdataset, which the lent GPU image lacks (everything else runs without it)
needs_webdataset = pytest.mark.skipif(importlib.util.find_spec("webdataset") is None,
                                      reason="tar shards need webdataset (not installed)")


@pytest.fixture
def tiny():
    """A tiny norm-pix MAE (64 px, patch 8, 64 patches) with a fixed init seed."""
    torch.manual_seed(0)
    return mae_vit_tiny_patch8(norm_pix_loss=True)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a process group's rendezvous in multi-process tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_images(n: int, size: int, seed: int = 1, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g)


def random_noise(n: int, length: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, length, generator=g)


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """scikit-learn's digits as an ImageFolder tree with train/ and val/ (see mae_fast.bench.digits)."""
    from mae_fast.bench.digits import write_digits

    return write_digits(tmp_path_factory.getbasetemp() / "digits" / "data")


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory, digits_data):
    """{seed: (initial weights, pretrained checkpoint)} of the tiny MAE briefly pretrained on the digits,
    made once per session for the probe and k-NN tests."""
    from mae_fast.bench.digits import PRETRAIN_EPOCHS, SEEDS, pretrained

    runs = tmp_path_factory.getbasetemp() / "digits" / "runs"
    return {seed: pretrained(runs, digits_data, seed, PRETRAIN_EPOCHS) for seed in SEEDS}

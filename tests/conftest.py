"""Shared test helpers: small models and fresh random inputs (never zeros), and the data and runs several
test files use, built once per session."""
import argparse
import importlib.util
import os
import socket
from pathlib import Path

# Kernel tests (tests/test_kernel_*.py) run the Triton kernels in the CPU interpreter on machines
# without an NVIDIA GPU; this must be set before triton is first imported in the pytest process.
if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")
import pytest
import torch

from mae_fast import mae_vit_tiny_patch8

DEMO = Path(__import__("mae_fast").__file__).parent / "assets" / "demo"

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


# ---------------------------------------------------------------- shared runs and data, built once per session
@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """scikit-learn's digits as an ImageFolder tree with train/ and val/ (tests/digits.py)."""
    from digits import write_digits

    return write_digits(tmp_path_factory.getbasetemp() / "digits" / "data")


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory, digits_data):
    """{seed: (initial weights, pretrained checkpoint)} of the tiny MAE briefly pretrained on the digits,
    made once per session for the probe and k-NN tests."""
    from digits import PRETRAIN_EPOCHS, SEEDS, pretrained

    runs = tmp_path_factory.getbasetemp() / "digits" / "runs"
    return {seed: pretrained(runs, digits_data, seed, PRETRAIN_EPOCHS) for seed in SEEDS}


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    """The demo photos, shrunk to 48 px, as an ImageFolder tree of 3 classes (19 images)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("labelled")
    for i, src in enumerate(sorted(DEMO.glob("*.jpg"))):
        (root / f"class{i % 3}").mkdir(exist_ok=True)
        with Image.open(src) as im:
            im.convert("RGB").resize((48, 48), Image.BICUBIC).save(root / f"class{i % 3}" / src.name)
    return root


@pytest.fixture(scope="session")
def easy_tree(tmp_path_factory):
    """A tiny learnable set: 8 demo photos (48 px) as class "plain" and their negatives as "inverted"."""
    from PIL import Image, ImageOps

    root = tmp_path_factory.mktemp("easy")
    for src in sorted(DEMO.glob("*.jpg"))[:8]:
        with Image.open(src) as im:
            im = im.convert("RGB").resize((48, 48), Image.BICUBIC)
        for cls, img in (("plain", im), ("inverted", ImageOps.invert(im))):
            (root / cls).mkdir(exist_ok=True)
            img.save(root / cls / src.name)
    return root


@pytest.fixture(scope="session")
def mae_ckpt(tmp_path_factory):
    """An official-format encoder-only MAE checkpoint of the tiny model (64 px): {"model", "args"}."""
    torch.manual_seed(0)
    mae = mae_vit_tiny_patch8()
    enc = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path_factory.mktemp("ckpt") / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": enc, "args": argparse.Namespace(model="mae_vit_tiny_patch8", input_size=64)}, path)
    return path

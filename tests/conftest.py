"""Shared test helpers: small models and fresh random inputs (never zeros), and the data and runs several
test files use, built once per session."""
import argparse
import contextlib
import fcntl
import importlib.util
import os
import socket
from pathlib import Path
from typing import Iterator

# Kernel tests (tests/test_kernel_*.py) run the Triton kernels in the CPU interpreter on machines
# without an NVIDIA GPU; this must be set before triton is first imported in the pytest process.
if not (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")):
    os.environ.setdefault("TRITON_INTERPRET", "1")
PARALLEL_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if PARALLEL_WORKER:  # one of the suite's parallel workers (one per core): one torch thread each, and in the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # processes it starts, so that no OpenMP pool spins on a core
import pytest
import torch

from mae_fast import mae_vit_tiny_patch8

if PARALLEL_WORKER:
    torch.set_num_threads(1)

DEMO = Path(__import__("mae_fast").__file__).parent / "assets" / "demo"

#: tar shards need webdataset, which the lent GPU image lacks (everything else runs without it)
needs_webdataset = pytest.mark.skipif(importlib.util.find_spec("webdataset") is None,
                                      reason="tar shards need webdataset (not installed)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Where pytest-xdist is installed (the test extras) and there is no CUDA device, the suite runs in one worker
    per core unless ``-n`` says otherwise (``-n 0``: in this process), each worker with one torch thread, the tests
    of one file in one worker unless ``--dist`` says otherwise (a file's module fixtures are built once). Without
    xdist (the GPU image), or with a GPU (whose tests would share it), nothing changes unless ``-n`` asks."""
    if not config.pluginmanager.hasplugin("xdist") or config.option.collectonly or PARALLEL_WORKER:
        return
    if config.option.numprocesses is None and torch.cuda.is_available():
        return
    if config.option.numprocesses is None:
        config.option.numprocesses = "auto"
    if not any(a in ("--dist", "-d") or a.startswith("--dist=") for a in config.invocation_params.args):
        config.option.dist = "loadfile"


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
def shared_folder(tmp_path_factory) -> Path:
    """A folder all the suite's parallel workers share (this run's own: the workers' base folders are in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if PARALLEL_WORKER else base


@contextlib.contextmanager
def exclusive(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created) for the block, among the suite's processes: yields True, or
    False at once when another holds it and ``wait`` is False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """scikit-learn's digits as an ImageFolder tree with train/ and val/ (tests/digits.py), written once for all
    workers (its writer publishes it whole)."""
    from digits import write_digits

    return write_digits(shared_folder(tmp_path_factory) / "digits" / "data")


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory, digits_data):
    """{seed: (initial weights, pretrained checkpoint)} of the tiny MAE briefly pretrained on the digits, made
    once per suite run for the probe and k-NN tests: parallel workers that need them pretrain the seeds nobody
    is pretraining yet, each under its seed's lock, then wait for the others'."""
    from digits import PRETRAIN_EPOCHS, SEEDS, pretrained

    runs = shared_folder(tmp_path_factory) / "digits" / "runs"
    done: dict = {}
    for wait in (False, True):
        for seed in (s for s in SEEDS if s not in done):
            with exclusive(runs / f".seed{seed}.lock", wait) as mine:
                if mine:
                    done[seed] = pretrained(runs, digits_data, seed, PRETRAIN_EPOCHS)
    return {seed: done[seed] for seed in SEEDS}


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

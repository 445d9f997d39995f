"""Test data: scikit-learn's bundled 8x8 digits (1797 images, 10 classes, no download) as an ImageFolder tree
with train/ and val/, and a tiny MAE briefly pretrained on train/ with the library (``parse_config`` +
``pretrain.train``). The probe and k-NN tests build these once per session (conftest: ``digits_data``,
``digits_runs``). Needs scikit-learn (in the ``test`` extra). bench/probe_study.py keeps its own copy: a
shipped tool does not import the tests."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

IMG_SIZE = 64  # one 8 px patch of mae_vit_tiny_patch8 per digit pixel
VAL_PER_CLASS = 36  # 360 validation images, 1437 training images
MODEL = "mae_vit_tiny_patch8"
#: 10 epochs of 89 steps (batch 16): 890 steps, about 25 s of a 2-core CPU per seed
PRETRAIN_EPOCHS = 10
SEEDS = (0, 1, 2)  # the seeds the statistical tests hold their margins on


def write_digits(root: Path, size: int = IMG_SIZE) -> Path:
    """root/train/<digit>/*.png and root/val/<digit>/*.png (a fixed stratified split); returns root.
    Each 8x8 image (values 0-16) is scaled to 0-255 and upscaled bicubically to ``size`` px, RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    if (root / "val").is_dir():
        return root
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    seen: Dict[int, int] = {}
    for i in order:
        label = int(digits.target[i])
        seen[label] = seen.get(label, 0) + 1
        split = "val" if seen[label] <= VAL_PER_CLASS else "train"
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB").save(
            folder / f"{i:04d}.png")
    return root


def pretrained(folder: Path, data: Path, seed: int, epochs: int = PRETRAIN_EPOCHS) -> Tuple[Path, Path]:
    """(initial weights, final checkpoint) of a brief pretraining on ``data``/train (tiny MAE, batch 16,
    lr 5e-4, fp32 on the CPU) from freshly initialized weights saved as an mae-fast checkpoint: the random
    arm of the probes, and what the pretraining starts from (``--init-from``)."""
    from mae_fast.models_mae import create_model
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.pretrain import train

    folder = Path(folder)
    init = folder / f"init-seed{seed}.pth"
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": create_model(MODEL, img_size=IMG_SIZE, norm_pix_loss=True).state_dict()}, init)
    out = folder / f"mae-seed{seed}-ep{epochs}"
    train(parse_config([
        "--model", MODEL, "--img-size", str(IMG_SIZE), "--loader", "pil", "--num-workers", "0", "--batch-size", "16",
        "--lr", "5e-4", "--warmup-epochs", "2", "--precision", "fp32", "--device", "cpu", "--no-progress",
        "--no-tensorboard", "--log-every", "100", "--save-every", "100000", "--compile", "off",
        "--data", str(Path(data) / "train"), "--epochs", str(epochs), "--seed", str(seed), "--init-from", str(init),
        "--output-dir", str(out), "--overwrite"]))
    return init, sorted((out / "checkpoints").glob("checkpoint-*.pth"))[-1]


def labelled_subset(root: Path, per_class: int) -> Path:
    """A copy of the tree with only the first ``per_class`` training images of each class (val/ whole):
    the few-label setting where a representation matters (pretraining still sees all of train/)."""
    root = Path(root)
    out = root.parent / f"{root.name}-{per_class}-per-class"
    if not (out / "val").is_dir():
        for folder in sorted((root / "train").iterdir()):
            (out / "train" / folder.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.iterdir())[:per_class]:
                shutil.copy(f, out / "train" / folder.name / f.name)
        shutil.copytree(root / "val", out / "val")
    return out

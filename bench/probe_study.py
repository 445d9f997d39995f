"""Does a probe tell a pretrained encoder from its own starting weights, on every seed? Side by side in one run:

    python -m mae_fast.bench.probe_study --out /tmp/probe-study --seeds 0,1,2,3,4
    python -m mae_fast.bench.probe_study --out /tmp/probe-study --seeds 0,1,2 --lars-epochs 60   # + the LARS probe

For each seed a tiny MAE is pretrained briefly on scikit-learn's digits (1797 8x8 images bundled
with scikit-learn, no download; written here as an ImageFolder tree), then the pretrained weights and the weights
it started from are probed with ``mae-linprobe --method logistic`` on all training
labels and on ``--per-class`` labels per class (and, with ``--lars-epochs``, the paper's LARS probe at batch
64). It prints each probe's pretrained-minus-initial top-1 gap per seed with its range, and writes the
record to ``OUT/probe_study-<device>-<time>.json``. Everything runs on the CPU in a few minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .records import record_header, write_result

# ---------------------------------------------------------------- the digits data and pretraining
IMG_SIZE = 64  # one 8 px patch of mae_vit_tiny_patch8 per digit pixel
VAL_PER_CLASS = 36  # 360 validation images, 1437 training images
MODEL = "mae_vit_tiny_patch8"
#: 10 epochs of 89 steps (batch 16): 890 steps, about 25 s of a 2-core CPU per seed
PRETRAIN_EPOCHS = 10


def write_digits(root: Path, size: int = IMG_SIZE) -> Path:
    """root/train/<digit>/*.png and root/val/<digit>/*.png (a fixed stratified split); returns root.
    Each 8x8 image (values 0-16) is scaled to 0-255 and upscaled bicubically to ``size`` px, RGB."""
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data needs scikit-learn: pip install scikit-learn") from None
    root = Path(root)
    if (root / "val").is_dir():
        return root
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    seen: Dict[int, int] = {}
    tmp = staging(root)
    for i in order:
        label = int(digits.target[i])
        seen[label] = seen.get(label, 0) + 1
        split = "val" if seen[label] <= VAL_PER_CLASS else "train"
        folder = tmp / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB").save(
            folder / f"{i:04d}.png")
    return publish(tmp, root)


def staging(final: Path) -> Path:
    """A new folder beside ``final`` to write it in (this process's own), so that a reader never sees it half
    written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # as mkdir would make it (mkdtemp makes it private)
    return tmp


def publish(tmp: Path, final: Path) -> Path:
    """Move the finished folder ``tmp`` to ``final`` in one step; where another process published it first,
    keep theirs (the same content) and drop ours."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "val").is_dir():
            raise
        shutil.rmtree(tmp)
    return final


def pretrain_args(size: int = IMG_SIZE) -> List[str]:
    """mae-pretrain options of the brief pretraining: tiny MAE (patch 8), batch 16, lr 5e-4, fp32 on the CPU."""
    return ["--model", MODEL, "--img-size", str(size), "--loader", "pil", "--num-workers", "0", "--batch-size",
            "16", "--lr", "5e-4", "--warmup-epochs", "2", "--precision", "fp32", "--device", "cpu",
            "--no-progress", "--no-tensorboard", "--log-every", "100", "--save-every", "100000", "--compile", "off"]


def initial_weights(folder: Path, seed: int, size: int = IMG_SIZE) -> Path:
    """A freshly initialized tiny MAE saved as an mae-fast checkpoint: the random arm, and what the
    pretraining starts from (``--init-from``)."""
    from mae_fast.models_mae import create_model

    path = Path(folder) / f"init-seed{seed}.pth"
    if not path.exists():
        torch.manual_seed(seed)
        model = create_model(MODEL, img_size=size, norm_pix_loss=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict()}, path)
    return path


def pretrained(folder: Path, data: Path, seed: int, epochs: int = PRETRAIN_EPOCHS, size: int = IMG_SIZE
               ) -> Tuple[Path, Path]:
    """(initial weights, final checkpoint) of a brief pretraining on ``data``/train from those weights;
    reused when ``folder`` already holds it (one pretraining per seed)."""
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.pretrain import train

    init = initial_weights(folder, seed, size)
    out = Path(folder) / f"mae-seed{seed}-ep{epochs}"
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*.pth"))
    if not ckpts:
        cfg = parse_config(pretrain_args(size) + ["--data", str(Path(data) / "train"), "--epochs", str(epochs),
                                                  "--seed", str(seed), "--init-from", str(init),
                                                  "--output-dir", str(out), "--overwrite"])
        train(cfg)
        ckpts = sorted((out / "checkpoints").glob("checkpoint-*.pth"))
    return init, ckpts[-1]


def labelled_subset(root: Path, per_class: int) -> Path:
    """A copy of the tree with only the first ``per_class`` training images of each class (val/ whole):
    the few-label setting where a representation matters (pretraining still sees all of train/)."""
    root = Path(root)
    out = root.parent / f"{root.name}-{per_class}-per-class"
    if not (out / "val").is_dir():
        tmp = staging(out)
        for folder in sorted((root / "train").iterdir()):
            (tmp / "train" / folder.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.iterdir())[:per_class]:
                shutil.copy(f, tmp / "train" / folder.name / f.name)
        shutil.copytree(root / "val", tmp / "val")
        publish(tmp, out)
    return out


# ---------------------------------------------------------------- the probes
CLASSIFIER = "vit_tiny_patch8"
COMMON = ["--model", CLASSIFIER, "--device", "cpu", "--precision", "fp32", "--num-workers", "0", "--no-progress",
          "--no-tensorboard"]


def probe(weights: Path, data: Path, out: Path, size: int, extra: List[str]) -> Dict[str, Any]:
    """``mae-linprobe`` of ``weights`` on ``data`` into ``out`` (replaced); its summary.json."""
    from mae_fast.train import linprobe

    argv = COMMON + ["--img-size", str(size), "--finetune", str(weights), "--data", str(data), "--output-dir",
                     str(out), "--overwrite", *extra]
    with contextlib.redirect_stdout(io.StringIO()):  # its summary line: read from summary.json instead
        code = linprobe.main(argv)
    if code != 0:
        raise RuntimeError(f"mae-linprobe {' '.join(argv)} failed")
    return json.loads((out / "summary.json").read_text())


def probes(args: argparse.Namespace) -> Dict[str, List[str]]:
    """name -> mae-linprobe options of each probe compared."""
    out = {"logistic_all_labels": ["--method", "logistic", "--batch-size", "256"]}
    if args.per_class:
        out[f"logistic_{args.per_class}_per_class"] = ["--method", "logistic", "--batch-size", "256"]
    if args.lars_epochs:
        out["lars"] = ["--method", "lars", "--batch-size", "64", "--epochs", str(args.lars_epochs), "--loader", "pil",
                       *(["--lr", str(args.lars_lr)] if args.lars_lr else [])]
    return out


def gap_range(rows: List[Dict[str, Any]], name: str) -> Dict[str, float]:
    gaps = [r[name]["gap"] for r in rows]
    return {"min": min(gaps), "max": max(gaps), "spread": max(gaps) - min(gaps), "mean": sum(gaps) / len(gaps),
            "all_positive": all(g > 0 for g in gaps)}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    root = Path(args.out)
    data = write_digits(root / f"digits-{args.img_size}px", args.img_size)
    few = labelled_subset(data, args.per_class) if args.per_class else data
    compared = probes(args)
    rows: List[Dict[str, Any]] = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        init, ckpt = pretrained(root / f"pretrain-{args.img_size}px", data, seed, args.epochs, args.img_size)
        row: Dict[str, Any] = {"seed": seed, "pretrained": str(ckpt), "seconds_pretrain": time.perf_counter() - t0}
        for name, extra in compared.items():
            source = few if "per_class" in name else data
            arms = {arm: probe(w, source, root / "probes" / f"{name}-seed{seed}-{arm}", args.img_size,
                               extra + ["--seed", str(seed)])
                    for arm, w in (("pretrained", ckpt), ("initial", init))}
            row[name] = {"pretrained": arms["pretrained"]["acc1"], "initial": arms["initial"]["acc1"],
                         "gap": arms["pretrained"]["acc1"] - arms["initial"]["acc1"],
                         "pool": arms["pretrained"]["pool"], "train_images": arms["pretrained"].get("train_images")}
            print(f"seed {seed} {name:>24}: pretrained {row[name]['pretrained']:6.2f}%  initial "
                  f"{row[name]['initial']:6.2f}%  gap {row[name]['gap']:+6.2f}", flush=True)
        rows.append(row)
    summary = {name: gap_range(rows, name) for name in compared}
    for name, s in summary.items():
        print(f"{name:>24}: gap {s['min']:+.2f} .. {s['max']:+.2f} (spread {s['spread']:.2f}, mean {s['mean']:+.2f})"
              f" over {len(rows)} seeds")
    return {**record_header("probe_study"), "img_size": args.img_size, "pretrain_epochs": args.epochs,
            "per_class": args.per_class, "lars_epochs": args.lars_epochs, "seeds": rows, "summary": summary}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="probe_study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the data, the pretrainings (reused), probes, record")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4],
                   help="comma-separated seeds (pretraining and probes)")
    p.add_argument("--img-size", type=int, default=IMG_SIZE, help="digits upscaled to this many px (multiple of 8)")
    p.add_argument("--epochs", type=int, default=PRETRAIN_EPOCHS, help="pretraining epochs (89 steps each)")
    p.add_argument("--per-class", type=int, default=20, help="labels per class of the few-label probe (0: none)")
    p.add_argument("--lars-epochs", type=int, default=0, help="epochs of the LARS probe at batch 64 (0: not run)")
    p.add_argument("--lars-lr", type=float, default=None, help="LARS probe lr (default: blr x 64 / 256)")
    args = p.parse_args(argv)
    if args.img_size < 8 or args.img_size % 8:
        p.error(f"--img-size {args.img_size}: must be a positive multiple of 8 (the tiny model's patch)")
    for flag, least in (("epochs", 1), ("per_class", 0), ("lars_epochs", 0)):
        if getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= {least}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.getLogger("mae_fast").setLevel(logging.WARNING)
    record = run(args)
    path = write_result("probe_study", record, folder=Path(args.out))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a probe tell a pretrained encoder from its own starting weights, on every seed? Side by side in one run:

    python -m mae_fast.bench.probe_study --out /tmp/probe-study --seeds 0,1,2,3,4
    python -m mae_fast.bench.probe_study --out /tmp/probe-study --seeds 0,1,2 --lars-epochs 60   # + the LARS probe

For each seed a tiny MAE is pretrained briefly on scikit-learn's digits (:mod:`digits`), then the pretrained
weights and the weights it started from are probed with ``mae-linprobe --method logistic`` on all training
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
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from mae_fast.bench.digits import IMG_SIZE, PRETRAIN_EPOCHS, labelled_subset, pretrained, write_digits
from mae_fast.bench.records import record_header, write_result

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

"""Does a progressive-resolution schedule learn what the fixed final size learns, for less compute? Side by side:

    python -m mae_fast.bench.progressive_study --out /tmp/progressive --seeds 0,1,2,3,4

For each seed a tiny MAE is pretrained on scikit-learn's digits (upscaled to 64 px, as in
``mae_fast.bench.probe_study``) twice from the same initial weights and for the same steps: at 64 px throughout
("fixed") and with ``--grow-from 32`` over the first 60% of the epochs ("grown": 32, 48, then 64 px). The two arms
alternate which runs first. Each arm reports its wall time per epoch at each size and in all, the MAE loss of its
final weights on the 360 held-out images at 64 px (the same masks for both), and the logistic probe's top-1 at
64 px; the schedule's FLOPs come from ``mae_fast.resolution``. It prints the per-seed differences with their
spread and writes the record to ``OUT/progressive_study-<device>-<time>.json``. CPU, a few minutes.
"""
from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .probe_study import IMG_SIZE, MODEL, initial_weights, pretrain_args, probe, write_digits
from .records import record_header, write_result

BATCH = 16  # pretrain_args' batch
ARMS = ("fixed", "grown")


def arm_args(arm: str, epochs: int, grow_from: int, grow_fraction: float = 0.6, positions: str = "official"
             ) -> List[str]:
    """The mae-pretrain options that make ``arm`` differ (none for the fixed size)."""
    if arm == "fixed":
        return []
    return ["--grow-from", str(grow_from), "--grow-epochs", str(round(grow_fraction * epochs)), "--grow-positions",
            positions]


def pretrain(out: Path, data: Path, seed: int, epochs: int, extra: List[str]) -> Dict[str, Any]:
    """One pretraining from the seed's initial weights; its wall time, per-epoch rows (size, seconds) and checkpoint."""
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.pretrain import train

    init = initial_weights(out.parent / "init", seed, IMG_SIZE)
    cfg = parse_config(pretrain_args(IMG_SIZE) + ["--data", str(data / "train"), "--epochs", str(epochs),
                                                  "--seed", str(seed), "--init-from", str(init), "--output-dir",
                                                  str(out), "--overwrite", "--save-every", "1000000", *extra])
    steps_per_epoch = (len(list((data / "train").rglob("*.png"))) // BATCH) // cfg.accum_iter
    cfg.log_every = steps_per_epoch  # one log row per epoch: its images/s give its wall time
    schedule = cfg.schedule()
    t0 = time.perf_counter()
    summary = train(cfg)
    seconds = time.perf_counter() - t0
    rows = list(csv.DictReader(open(out / "log.csv")))
    per_epoch = [{"epoch": i, "img_size": schedule.size_at(i),
                  "seconds": steps_per_epoch * BATCH / float(r["images_per_s"]), "loss": float(r["loss"])}
                 for i, r in enumerate(rows)]
    return {"seconds": seconds, "epochs": per_epoch, "final_epoch_loss": per_epoch[-1]["loss"],
            "checkpoint": summary["last_checkpoint"]}


@torch.no_grad()
def heldout_loss(checkpoint: str, data: Path, seed: int) -> float:
    """The MAE loss (norm-pix) of a checkpoint on every held-out image at 64 px, masks from a fixed generator."""
    from mae_fast.checkpoint import load_mae_checkpoint
    from mae_fast.models_mae import create_model
    from mae_fast.train.visualize import load_image

    model = create_model(MODEL, img_size=IMG_SIZE, norm_pix_loss=True)
    load_mae_checkpoint(model, checkpoint)
    model.eval()
    imgs = torch.cat([load_image(str(p), IMG_SIZE) for p in sorted((data / "val").rglob("*.png"))])
    noise = torch.rand(len(imgs), model.config.num_patches, generator=torch.Generator().manual_seed(1000 + seed))
    return float(model(imgs, noise=noise)[0])


def spread(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "spread": max(values) - min(values)}


def per_size_seconds(rows: List[Dict[str, Any]]) -> Dict[int, float]:
    """Median wall time of an epoch at each size (the first epoch, which starts the run, left out where its size has
    others)."""
    sizes: Dict[int, List[float]] = {}
    for r in rows:
        sizes.setdefault(r["img_size"], []).append(r["seconds"])
    if len(sizes[rows[0]["img_size"]]) > 1:
        sizes[rows[0]["img_size"]].pop(0)
    return {size: statistics.median(s) for size, s in sorted(sizes.items())}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from mae_fast.resolution import schedule_training_flops

    root = Path(args.out)
    data = write_digits(root / f"digits-{IMG_SIZE}px", IMG_SIZE)
    rows: List[Dict[str, Any]] = []
    for i, seed in enumerate(args.seeds):
        row: Dict[str, Any] = {"seed": seed}
        for arm in (ARMS if i % 2 == 0 else ARMS[::-1]):  # alternate which arm runs first
            res = pretrain(root / f"{arm}-seed{seed}", data, seed, args.epochs,
                           arm_args(arm, args.epochs, args.grow_from, args.grow_fraction, args.grow_positions))
            res["heldout_loss"] = heldout_loss(res["checkpoint"], data, seed)
            res["probe_acc1"] = probe(Path(res["checkpoint"]), data, root / "probes" / f"{arm}-seed{seed}", IMG_SIZE,
                                      ["--method", "logistic", "--batch-size", "256", "--seed", str(seed),
                                       "--l2", str(args.probe_l2)])["acc1"]
            res["seconds_per_epoch_at"] = per_size_seconds(res["epochs"])
            row[arm] = res
            print(f"seed {seed} {arm:>5}: {res['seconds']:6.1f} s, held-out loss {res['heldout_loss']:.4f}, "
                  f"last-epoch loss {res['final_epoch_loss']:.4f}, probe top-1 {res['probe_acc1']:.2f}%, s/epoch at "
                  + ", ".join(f"{s} px {t:.2f}" for s, t in res["seconds_per_epoch_at"].items()), flush=True)
        rows.append(row)
    from mae_fast.train.engine.config import parse_config

    cfg = parse_config(pretrain_args(IMG_SIZE) + ["--epochs", str(args.epochs),
                                                  *arm_args("grown", args.epochs, args.grow_from, args.grow_fraction,
                                                            args.grow_positions)])
    flops = schedule_training_flops(MODEL, cfg.schedule())
    summary: Dict[str, Any] = {"flops_fraction_of_fixed": flops["fraction_of_fixed"],
                               "schedule": cfg.schedule().describe()}
    for key in ("seconds", "heldout_loss", "final_epoch_loss", "probe_acc1"):
        summary[key] = {arm: spread([r[arm][key] for r in rows]) for arm in ARMS}
        summary[key]["grown_minus_fixed"] = spread([r["grown"][key] - r["fixed"][key] for r in rows])
    summary["time_ratio"] = spread([r["grown"]["seconds"] / r["fixed"]["seconds"] for r in rows])
    print(f"schedule: {summary['schedule']}, {args.grow_positions} position tables; FLOPs {flops['fraction_of_fixed']:.1%} of the fixed size")
    for key, s in summary.items():
        if isinstance(s, dict) and "grown_minus_fixed" in s:
            d, f = s["grown_minus_fixed"], s["fixed"]
            print(f"{key:>16}: fixed {f['mean']:.4g} ({f['min']:.4g} .. {f['max']:.4g}), grown {s['grown']['mean']:.4g} "
                  f"({s['grown']['min']:.4g} .. {s['grown']['max']:.4g}); grown - fixed {d['mean']:+.4g} "
                  f"({d['min']:+.4g} .. {d['max']:+.4g}) over {len(rows)} seeds")
    t = summary["time_ratio"]
    print(f"wall time grown / fixed: {t['mean']:.3f} ({t['min']:.3f} .. {t['max']:.3f})")
    return {**record_header("progressive_study"), "epochs": args.epochs, "grow_from": args.grow_from,
            "grow_fraction": args.grow_fraction, "grow_positions": args.grow_positions,
            "probe_l2": args.probe_l2,
            "img_size": IMG_SIZE, "seeds": rows, "summary": summary}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="progressive_study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the data, the pretrainings, probes and the record")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                   help="comma-separated seeds (initial weights, data order, masks, probe)")
    p.add_argument("--epochs", type=int, default=10, help="pretraining epochs of each arm (89 steps each)")
    p.add_argument("--grow-from", type=int, default=32, help="the grown arm's first size (a multiple of 8)")
    p.add_argument("--grow-fraction", type=float, default=0.6, help="the grown arm grows over this fraction of the "
                   "epochs, then trains at 64 px")
    p.add_argument("--grow-positions", choices=["official", "scaled"], default="official",
                   help="the grown arm's position tables below 64 px (mae-pretrain --grow-positions)")
    p.add_argument("--probe-l2", type=float, default=1e-3, help="the logistic probe's penalty, the same for both arms "
                   "(a fixed one: the penalty search costs minutes per probe)")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error(f"--epochs {args.epochs}: must be >= 2")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.getLogger("mae_fast").setLevel(logging.WARNING)
    record = run(args)
    print(f"wrote {write_result('progressive_study', record, folder=Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``mae-plot RUN_DIR``: a run's curves from its logs: ``loss.png`` (training loss and lr per step, from
``log.csv``) and, for fine-tuning / linear probing, ``accuracy.png`` (top-1 / top-5 per evaluation, from
``eval.csv``). The training commands draw them at the end of a run; this command draws them again."""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Dict, List, Optional


def read_csv(path: Path) -> Dict[str, List[float]]:
    """Columns of a log CSV as floats (empty when the file is missing or has no rows)."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: [float(r[k]) if r[k] not in ("", "nan") else float("nan") for r in rows] for k in rows[0]}


def plot_run(run_dir: str | Path) -> List[Path]:
    """Write ``loss.png`` (and ``accuracy.png`` when there is an ``eval.csv``) into ``run_dir``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written: List[Path] = []
    train = read_csv(run_dir / "log.csv")
    if train.get("step"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(train["step"], train["loss"], color="tab:blue", label="loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax2 = ax.twinx()
        ax2.plot(train["step"], train["lr"], color="tab:gray", alpha=0.6, label="lr")
        ax2.set_ylabel("lr")
        ax.set_title(run_dir.name)
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "loss.png")
    evals = read_csv(run_dir / "eval.csv")
    if evals.get("step") and "acc1" in evals:
        epochs = evals.get("epoch", evals["step"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(epochs, evals["acc1"], marker="o", label="top-1")
        if "acc5" in evals:
            ax.plot(epochs, evals["acc5"], marker=".", label="top-5")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.legend()
        ax.set_title(run_dir.name)
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "accuracy.png")
    return written


def main(argv: Optional[List[str]] = None) -> int:
    from mae_fast.errors import ConfigError

    from .cli import Parser, run_main

    p = Parser(prog="mae-plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run folder (holds log.csv; eval.csv for fine-tuning / linear probing)")

    def run(args: argparse.Namespace) -> None:
        if not (Path(args.run_dir) / "log.csv").is_file():
            raise ConfigError(f"{args.run_dir}: no log.csv (not a run folder)")
        written = plot_run(args.run_dir)
        if not written:
            raise ConfigError(f"{args.run_dir}: nothing to plot (log.csv has no logged steps yet, and no "
                              f"eval.csv with accuracies)")
        for path in written:
            print(f"wrote {path}", flush=True)

    return run_main("mae-plot", lambda: p.parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())

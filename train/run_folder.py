"""A training run's folder and logs: choosing a folder that no other run wrote (or refusing one that
holds a run), removing only this run's leftovers, ``log.csv`` / ``eval.csv`` / TensorBoard scalars, a
plain line per log point when output is not a terminal, and strict-JSON summaries."""
from __future__ import annotations

import csv
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from .cli import ConfigError, strict_json

log = logging.getLogger("mae_fast.train")

#: what a run writes in its folder; ``--overwrite`` removes exactly these
RUN_FILES = ("config.json", "summary.json", "log.csv", "eval.csv", "reconstruction.png", "loss.png",
             "accuracy.png")
RUN_DIRS = ("checkpoints", "tensorboard")
_CHECKPOINT = re.compile(r"^checkpoint-\d{8}(\.pth)?$")  # a file, or a sharded checkpoint's folder
_CHECKPOINT_TMP = re.compile(r"^\.checkpoint-\d{8}(\.pth\..+\.tmp|\.sharded\.tmp)$")


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds what a run writes (a config, a log, a summary or a checkpoint)."""
    folder = Path(folder)
    if any((folder / name).exists() for name in ("config.json", "summary.json", "log.csv")):
        return True
    ckpts = folder / "checkpoints"
    return ckpts.is_dir() and any(_CHECKPOINT.match(p.name) for p in ckpts.iterdir())


def _numbered(base: Path, n: int) -> Path:
    return base if n == 1 else base.with_name(f"{base.name}-{n}")


def choose_run_dir(output_dir: str, default: str, resume: str, overwrite: bool) -> Path:
    """The folder this run writes to.

    An explicit ``output_dir`` that holds a run is refused unless the run is continued (``--resume``) or
    replaced (``--overwrite``). Without one, a fresh run takes the first of ``default``, ``default-2``, ...
    that holds no run (as timm does), and ``--resume auto`` continues the newest of them.
    """
    if output_dir:
        folder = Path(output_dir)
        if holds_run(folder) and not resume and not overwrite:
            raise ConfigError(f"--output-dir {folder} already holds a run: continue it with --resume auto, "
                              f"replace it with --overwrite, or choose another --output-dir")
        return folder
    if resume and resume != "auto" and Path(resume).parent.name == "checkpoints":
        return Path(resume).parent.parent  # continue the run the checkpoint file belongs to
    base = Path(default)
    n = 1
    while holds_run(_numbered(base, n)):
        n += 1
    if resume and n > 1:
        return _numbered(base, n - 1)
    if overwrite:
        return base
    return _numbered(base, n)


def clear_run(folder: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote in ``folder`` (only the files a run writes)."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


def remove_stale_temp(folder: Path) -> int:
    """Delete checkpoint temp files a killed save left in ``folder/checkpoints``; returns how many."""
    ckpts = Path(folder) / "checkpoints"
    if not ckpts.is_dir():
        return 0
    stale = [p for p in ckpts.iterdir() if _CHECKPOINT_TMP.match(p.name)]
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished checkpoint file(s) a killed save left in %s", len(stale), ckpts)
    return len(stale)


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (NaN / Infinity as null), written whole."""
    Path(path).write_text(strict_json(obj) + "\n")


class RunLog:
    """``log.csv`` (+ ``eval.csv``) and TensorBoard scalars on the main process; appends when resuming.

    Without a terminal (output redirected to a file) ``line`` prints one plain line per log point
    instead of a progress bar."""

    def __init__(self, folder: Path, enabled: bool, tensorboard: bool):
        self.enabled, self.folder = enabled, Path(folder)
        self.writer = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        new = not (self.folder / "log.csv").exists()
        self.csv_file = open(self.folder / "log.csv", "a", newline="")
        self.csv = csv.writer(self.csv_file)
        if new:
            self.csv.writerow(["step", "epoch", "loss", "lr", "images_per_s"])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: CSV log only")

    def write(self, step: int, epoch: float, loss: float, lr: float, ips: float) -> None:
        if not self.enabled:
            return
        self.csv.writerow([step, f"{epoch:.4f}", f"{loss:.6f}", f"{lr:.6e}", f"{ips:.1f}"])
        self.csv_file.flush()
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/images_per_s", ips, step)

    def write_eval(self, step: int, epoch: float, metrics: Dict[str, float]) -> None:
        """One row of ``eval.csv`` (step, epoch, then ``metrics`` in order) and TensorBoard eval/* scalars."""
        if not self.enabled:
            return
        path = self.folder / "eval.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "epoch", *metrics])
            w.writerow([step, f"{epoch:.4f}", *(f"{v:.6f}" for v in metrics.values())])
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.csv_file.close()
            if self.writer:
                self.writer.close()


def use_progress_bar(requested: bool, stream: Optional[Any] = None) -> bool:
    """A tqdm bar only when asked for and the output is a terminal (else: one line per log point)."""
    stream = stream if stream is not None else sys.stderr
    return bool(requested) and hasattr(stream, "isatty") and stream.isatty()

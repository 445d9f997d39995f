"""Training checkpoints: atomic saves every N steps keeping the last k, RNG capture, newest-valid resume."""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from mae_fast.checkpoint import CheckpointError, read_checkpoint, save_checkpoint

log = logging.getLogger("mae_fast.train")

_NAME = re.compile(r"^checkpoint-(\d{8})\.pth$")
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "loader", "rng", "config")


def rng_state() -> Dict[str, Any]:
    """Every RNG a training step may draw from (torch CPU and CUDA, numpy, python)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))


class CheckpointManager:
    """Saves ``checkpoint-<step>.pth`` atomically in ``folder``, keeps the newest ``keep``, and finds
    the newest one that reads back complete (a corrupt file is named and skipped)."""

    def __init__(self, folder: Path, keep: int = 3):
        self.folder = Path(folder)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.folder / f"checkpoint-{step:08d}.pth"

    def list(self) -> List[Tuple[int, Path]]:
        """(step, path) of every checkpoint file, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def save(self, state: Dict[str, Any]) -> Path:
        path = save_checkpoint(state, self.path_for(state["step"]))
        for _, old in self.list()[: -self.keep] if self.keep > 0 else []:
            old.unlink(missing_ok=True)
        return path

    def load_latest(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """Newest complete checkpoint, or None; corrupt or incomplete files are reported and skipped."""
        for _, path in reversed(self.list()):
            try:
                state = read_checkpoint(path)
                missing = [k for k in REQUIRED_KEYS if k not in state]
                if missing:
                    raise CheckpointError(f"checkpoint {path}: incomplete, missing {missing}")
                return path, state
            except CheckpointError as e:
                log.warning("%s; trying the previous checkpoint", e)
        return None

"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), for FSDP2 at scale: every
rank writes its own shards of the model and optimizer (no full gather on one rank); the run state
(step, loader position, every rank's RNG states, config, step runner) is a small ``run_state.pt``.

Layout: ``checkpoints/checkpoint-<step:08d>/`` holding DCP's ``.metadata`` and ``__<rank>_0.distcp``
files plus ``run_state.pt``. Atomic: all ranks write into ``.checkpoint-<step>.sharded.tmp``; after a
barrier (every rank's files are written and fsynced) rank 0 renames it to the final name and fsyncs
the folder, so a checkpoint is complete or not there. Loading reshards to any world size (DCP), and
:func:`consolidate` turns one into the single file ``--checkpoint-format full`` writes (official keys
under ``"model"``): loadable by the official code, timm (encoder) and ``mae-finetune``.

    mae-convert runs/x/checkpoints/checkpoint-00010000 out.pth      # consolidate (mae_fast.convert)
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from mae_fast.files import fsync_dir
from mae_fast.checkpoint import (RUN_STATE, CheckpointError, dcp_errors, is_sharded_checkpoint, read_checkpoint,
                                 read_sharded, save_checkpoint)

log = logging.getLogger("mae_fast.train")

_NAME = re.compile(r"^checkpoint-(\d{8})$")
_TMP = re.compile(r"^\.checkpoint-\d{8}\.sharded\.tmp$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Model and optimizer state as this rank's shards (DTensors under FSDP2), official key names."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


class ShardedCheckpoints:
    """``checkpoint-<step>/`` folders in ``folder``: atomic collective saves, the newest ``keep``
    kept, and the newest that loads completely found for ``--resume auto``."""

    def __init__(self, folder: Path, keep: int = 3):
        self.folder, self.keep = Path(folder), keep

    def path_for(self, step: int) -> Path:
        return self.folder / f"checkpoint-{step:08d}"

    def list(self) -> List[Tuple[int, Path]]:
        """(step, folder) of every complete sharded checkpoint, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.folder.iterdir()
                      if (m := _NAME.match(p.name)) and is_sharded_checkpoint(p))

    def remove_stale_temp(self) -> None:
        """Delete temp folders of saves a crash interrupted (main rank, before training)."""
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                if _TMP.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             run_state: Dict[str, Any]) -> Path:
        """Collective: every rank writes its shards; rank 0 writes ``run_state`` and publishes the
        folder once all ranks are done."""
        import torch.distributed.checkpoint as dcp

        final = self.path_for(step)
        tmp = self.folder / f".{final.name}.sharded.tmp"
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        with dcp_errors(tmp):
            dcp.save(sharded_state(model, optimizer), storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        if _is_main():
            save_checkpoint(run_state, tmp / RUN_STATE)
        _barrier()  # every rank's shards are on disk
        if _is_main():
            if final.exists():  # the same step saved again (e.g. a rerun of the last step)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.folder)
            for _, old in self.list()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             check: Optional[Callable[[Dict[str, Any], str], None]] = None) -> Dict[str, Any]:
        """Collective: load ``path`` into ``model`` and ``optimizer`` (each rank reads its shards);
        returns the run state. ``check(state, source)`` sees the weights' shapes (meta tensors) first."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = Path(path)
        run_state = read_checkpoint(path / RUN_STATE)  # CheckpointError naming the file if damaged
        with dcp_errors(path):
            shapes = checkpoint_shapes(path)
        if check is not None:
            check({**run_state, "model": shapes}, str(path))
        state = sharded_state(model, optimizer)
        with dcp_errors(path):
            dcp.load(state, storage_reader=dcp.FileSystemReader(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return run_state

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    check: Optional[Callable[[Dict[str, Any], str], None]] = None
                    ) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """Collective: the newest checkpoint that loads completely (a damaged one is named and the
        previous one tried), loaded; None when there is none."""
        for _, path in reversed(self.list()):
            try:
                return path, self.load(path, model, optimizer, check)
            except CheckpointError as e:
                log.warning("%s; trying the previous checkpoint", e)
        return None


def checkpoint_shapes(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The model's tensors in a DCP checkpoint as meta tensors (names and shapes, no data read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len("model."):]: torch.empty(v.size, dtype=v.properties.dtype, device="meta")
            for k, v in meta.items() if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}


def consolidate(sharded_dir: str | os.PathLike, out_file: str | os.PathLike, weights_only: bool = False) -> Path:
    """Write the sharded checkpoint ``sharded_dir`` as one ``.pth`` file (atomically): the same
    content as a full checkpoint, or with ``weights_only`` just ``{"model": ...}``."""
    state = read_sharded(sharded_dir)
    if weights_only:
        state = {"model": state["model"]}
    return save_checkpoint(state, out_file)

"""A training run's state on disk, in one place: the run folder (chosen so no other run's files are touched),
its logs (``log.csv``, ``eval.csv``, TensorBoard), and its checkpoints: atomic full ``.pth`` files or sharded
``torch.distributed.checkpoint`` folders, each holding model (official keys), optimizer, step, loader position,
every rank's RNG states, the step runner and the config, so that ``--resume`` continues a run exactly.

File names: ``checkpoints/checkpoint-<step:08d>.pth`` (full) or ``checkpoints/checkpoint-<step:08d>/`` (sharded:
DCP's ``.metadata`` and ``__<rank>_0.distcp`` files plus ``run_state.pt``), written through a temp name
(``.checkpoint-<step>.pth.<random>.tmp``, ``.checkpoint-<step>.sharded.tmp``) that a crash leaves behind and the
next start removes. A sharded checkpoint loads on any world size (DCP); :func:`consolidate` turns one into the
single file a full save writes (``mae-convert runs/x/checkpoints/checkpoint-00010000 out.pth``).
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from mae_fast.checkpoint import (RUN_STATE, dcp_errors, is_sharded_checkpoint, read_checkpoint, read_sharded,
                                 save_checkpoint)
from mae_fast.device import DistInfo
from mae_fast.errors import CheckpointError, ConfigError, NonFiniteLossError
from mae_fast.files import fsync_dir, strict_json
from mae_fast.kernels import backend_choices, restore_backend_choices

log = logging.getLogger("mae_fast.train")

#: what a run writes in its folder; ``--overwrite`` removes exactly these
RUN_FILES = ("config.json", "summary.json", "log.csv", "eval.csv", "reconstruction.png", "loss.png",
             "accuracy.png")
RUN_DIRS = ("checkpoints", "tensorboard")
#: the one checkpoint name: ``checkpoint-<step:08d>`` + ``.pth`` (full) or nothing (a sharded folder)
CHECKPOINT = re.compile(r"^checkpoint-(\d{8})(\.pth)?$")
CHECKPOINT_TMP = re.compile(r"^\.checkpoint-\d{8}(\.pth\..+\.tmp|\.sharded\.tmp)$")
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "loader", "rng", "config")


def checkpoint_name(step: int, sharded: bool = False) -> str:
    """``checkpoint-<step:08d>.pth``, or the sharded folder's ``checkpoint-<step:08d>``."""
    return f"checkpoint-{step:08d}" + ("" if sharded else ".pth")


def _checkpoints_in(folder: Path, sharded: bool) -> List[Tuple[int, Path]]:
    """(step, path) of every checkpoint of one kind in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name))
             and (m.group(2) is None) == sharded and (not sharded or is_sharded_checkpoint(p))]
    return sorted(found)


# ------------------------------------------------------------------ run folder and logs
def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds what a run writes (a config, a log, a summary or a checkpoint)."""
    folder = Path(folder)
    if any((folder / name).exists() for name in ("config.json", "summary.json", "log.csv")):
        return True
    ckpts = folder / "checkpoints"
    return ckpts.is_dir() and any(CHECKPOINT.match(p.name) for p in ckpts.iterdir())


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


def choose_shared_run_dir(output_dir: str, default: str, resume: str, overwrite: bool, info: DistInfo) -> Path:
    """:func:`choose_run_dir` on every rank (each refuses alike), rank 0's choice shared with the others."""
    choice = [str(choose_run_dir(output_dir, default, resume, overwrite))]
    if info.enabled:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0])


def clear_run(folder: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote in ``folder`` (only the files a run writes)."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


def remove_stale_temp(ckpts: Path) -> int:
    """Delete the temp files and folders a killed save (full or sharded) left in the checkpoint folder ``ckpts``;
    returns how many."""
    ckpts = Path(ckpts)
    if not ckpts.is_dir():
        return 0
    stale = [p for p in ckpts.iterdir() if CHECKPOINT_TMP.match(p.name)]
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


# ------------------------------------------------------------------ RNG and state gathered for a save
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


def gather_rng_states(info: DistInfo) -> Any:
    """This process's RNG states, or (under torchrun) every rank's as a list indexed by rank."""
    states: Any = rng_state()
    if info.enabled:
        gathered: List[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, states)
        states = gathered
    return states


def agree_kernel_choices(info: DistInfo) -> None:
    """Every rank adopts rank 0's timed kernel choices (``mae_fast.kernels.backend_choices``). Each rank
    times an op at its own first step, so ranks could otherwise compute with different implementations
    (rounding differs) and a resumed run, which adopts rank 0's from the checkpoint, would not continue
    exactly. All ranks call it at the same point (after the first step, at every save)."""
    if not info.enabled:
        return
    box = [backend_choices() if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    if not info.is_main:
        restore_backend_choices(box[0])


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> Dict[str, Any]:
    """Model (official keys) and optimizer state gathered in full, valid for any world size."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {"model": {k.removeprefix("module."): v for k, v in model_sd.items()}, "optimizer": optim_sd}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Inverse of :func:`full_state` on every rank (each loads the full state, keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=opts)


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite, read with one host sync."""
    flags = [torch.isfinite(p).all() for p in (model.module if hasattr(model, 'module') else model).parameters()]
    return bool(torch.stack([f.full_tensor() if hasattr(f, "full_tensor") else f for f in flags]).all())


# ------------------------------------------------------------------ checkpoint files
class CheckpointManager:
    """Saves ``checkpoint-<step>.pth`` atomically in ``folder``, keeps the newest ``keep``, and finds
    the newest one that reads back complete (a corrupt file is named and skipped)."""

    def __init__(self, folder: Path, keep: int = 3):
        self.folder = Path(folder)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.folder / checkpoint_name(step)

    def list(self) -> List[Tuple[int, Path]]:
        """(step, path) of every checkpoint file, oldest first."""
        return _checkpoints_in(self.folder, sharded=False)

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
        return self.folder / checkpoint_name(step, sharded=True)

    def list(self) -> List[Tuple[int, Path]]:
        """(step, folder) of every complete sharded checkpoint, oldest first."""
        return _checkpoints_in(self.folder, sharded=True)

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


# ------------------------------------------------------------------ save and resume of a training run
def find_resume_checkpoint(resume: str, folder: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """(path, state) for ``--resume``: "auto" = the newest complete checkpoint in ``folder``, a file,
    or None for a fresh run."""
    if resume == "auto":
        return CheckpointManager(folder).load_latest()
    if resume:
        return Path(resume), read_checkpoint(resume)
    return None


def rng_of_rank(saved: Any, rank: int) -> Dict[str, Any]:
    """This rank's saved RNG states; a rank the saving run did not have (resumed on more processes) takes
    rank 0's. Pretraining's masks and crops come from (seed, step) generators and do not depend on it;
    draws from the global generators (fine-tuning's drop path, mixup) are then not those of the saving run."""
    if not isinstance(saved, list):
        return saved
    if rank >= len(saved):
        log.info("rank %d: the checkpoint was saved by %d processes; restoring rank 0's RNG states", rank, len(saved))
        return saved[0]
    return saved[rank]


def open_run_checkpoints(cfg: Any, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                         runner: Any, loader: Any, info: DistInfo) -> "RunCheckpoints":
    """The run's checkpoints in ``out/checkpoints``, after the main process removed the old run's files
    (``--overwrite``) or the temp files a killed save left (``--resume``)."""
    if info.is_main and cfg.overwrite:
        clear_run(out)
    if info.is_main and cfg.resume:
        remove_stale_temp(out / "checkpoints")
    return RunCheckpoints(out / "checkpoints", cfg.keep_checkpoints, model, optimizer, runner, loader, info,
                          dataclasses.asdict(cfg))


class RunCheckpoints:
    """Save and resume of a training run: model (official keys) and optimizer gathered in full, step,
    loader position, every rank's RNG state, the step runner and the config; atomic, newest k kept."""

    def __init__(self, folder: Path, keep: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 runner: Any, loader: Any, info: DistInfo, config: Dict[str, Any],
                 checkpoint_format: Optional[str] = None):
        self.manager = CheckpointManager(folder, keep=keep)
        self.model, self.optimizer, self.runner, self.loader = model, optimizer, runner, loader
        self.info, self.config = info, config
        self.last: Optional[Path] = None
        # "sharded": torch.distributed.checkpoint folders, each rank writing its shards (FSDP2 at scale)
        self.sharded = (checkpoint_format or config.get("checkpoint_format", "full")) == "sharded"
        self.sharded_store = ShardedCheckpoints(folder, keep=keep)

    def resume(self, resume: str, check: Optional[Callable[[Dict[str, Any], str], None]] = None
               ) -> Optional[Dict[str, Any]]:
        """Restore everything from ``--resume``; returns the state (for extra fields) or None.
        ``check(state, source)`` may validate the weights first (clear errors)."""
        sharded = self._resume_sharded(resume, check)
        found = sharded or find_resume_checkpoint(resume, self.manager.folder)
        if not found:
            return None
        self.last, state = found
        if not sharded:
            if check is not None:
                check(state, str(self.last))
            load_full_state(self.model, self.optimizer, state)
        self.runner.load_state_dict(state.get("step_runner"))
        self.loader.load_state_dict(state["loader"])
        set_rng_state(rng_of_rank(state["rng"], self.info.rank))
        restore_backend_choices(state.get("kernel_choices", {}))  # the kernels the run was computing with
        if self.info.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", self.last, int(state["step"]),
                     state["loader"]["epoch"], state["loader"]["batch"])
        return state

    def _resume_sharded(self, resume: str, check: Optional[Callable[[Dict[str, Any], str], None]]
                        ) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """(folder, run state) of a sharded checkpoint, its weights loaded; None for other resumes."""
        if resume and resume != "auto" and is_sharded_checkpoint(resume):
            return Path(resume), self.sharded_store.load(Path(resume), self.model, self.optimizer, check)
        if resume == "auto" and self.sharded:  # temp folders of a killed save: removed by open_run_checkpoints
            return self.sharded_store.load_latest(self.model, self.optimizer, check)
        return None

    def save(self, step: int, **extra: Any) -> Path:
        """Checkpoint at ``step`` (all ranks call it); refuses non-finite weights."""
        self.runner.check(self.last)
        if not all_finite(self.model):
            raise NonFiniteLossError(f"step {step}: weights are not finite; no checkpoint written "
                                     f"(last good: {self.last or 'none'})")
        agree_kernel_choices(self.info)  # what is saved is what every rank computes with
        rngs = gather_rng_states(self.info)
        run_state = dict(step=step, epoch=self.loader.epoch, loader=self.loader.state_dict(), rng=rngs,
                         config=self.config, step_runner=self.runner.state_dict(),
                         world_size=self.info.world_size, kernel_choices=backend_choices(), **extra)
        if self.sharded:
            self.last = self.sharded_store.save(step, self.model, self.optimizer, run_state)
            return self.last
        state = full_state(self.model, self.optimizer, self.info)
        path = None
        if self.info.is_main:
            state.update(run_state)
            path = self.manager.save(state)
        if self.info.enabled:
            dist.barrier()
        self.last = path or self.manager.path_for(step)
        return self.last

"""Data loading for MAE pretraining: one interface (:func:`build_loader`) over a PIL/DataLoader
loader, a DALI loader (GPU decode) and a synthetic device-resident loader.

Every loader yields ImageNet-normalized images (N, 3, size, size) on ``device`` (or
``(images, labels)`` with ``with_labels=True``) and has ``len``, ``set_epoch`` and a position
(``state_dict``/``load_state_dict``: epoch and batch index) to resume mid-epoch exactly.

Order and sharding (shared by the PIL and DALI loaders): each epoch the file list is permuted with
``torch.randperm`` seeded by ``seed + epoch`` (as DistributedSampler does) and rank ``r`` takes
``perm[r::world_size]``, so every readable file is read exactly once per epoch across ranks and
shards differ by at most one file. ``drop_last=False`` (default) keeps every file: the last batch of
a rank may be smaller, and in the rare case where shard sizes straddle a batch boundary one rank
runs one batch more. ``drop_last=True`` (use it for DDP training) gives every rank
``(num_files // world_size) // batch_size`` full batches and leaves the remaining files out of that
epoch (a different few each epoch). Crop and flip of a sample are drawn from (seed, epoch, file
index), so results do not depend on workers, sharding or the resume point.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
import logging
import math
import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import SCALE, augment_pil, load_rgb_or_reason, normalize, sample_params
from .sources import ImageList, scan_images

log = logging.getLogger("mae_fast.data")

KINDS = ("auto", "dali", "pil", "synthetic")
_AUTO_LOGGED = False


def epoch_order(num_files: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                shuffle: bool = True) -> list[int]:
    """File indices read by ``rank`` in ``epoch``: a (seed + epoch) permutation, strided by rank."""
    if shuffle:
        g = torch.Generator()
        g.manual_seed(int(seed) + int(epoch))
        order = torch.randperm(num_files, generator=g).tolist()
    else:
        order = list(range(num_files))
    return order[rank::world_size]


class Loader(ABC):
    """Common position logic: iterate the current epoch from the current batch, then advance."""

    kind = "base"

    def __init__(self, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, with_labels: bool = False, num_files: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.with_labels, self.num_files = drop_last, with_labels, num_files
        self.device, self.dtype = torch.device(device), dtype
        self.epoch, self.batch = 0, 0
        self.skipped: list[tuple[str, str]] = []  # unreadable files found before training
        self._runtime_skipped: dict[str, str] = {}  # ... and while decoding

    # ----- position -----
    def shard_size(self) -> int:
        """Files this rank reads per epoch (before dropping the last partial batch)."""
        n = self.num_files
        return n // self.world_size + (1 if self.rank < n % self.world_size else 0)

    def __len__(self) -> int:
        if self.drop_last:
            return (self.num_files // self.world_size) // self.batch_size
        return math.ceil(self.shard_size() / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; a new epoch starts at batch 0, the current one keeps its position."""
        if epoch != self.epoch:
            self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out: resume yields the batch after it."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_files": self.num_files, "kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; a changed batch size or world size maps it by samples seen."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        old = (state.get("batch_size", self.batch_size), state.get("world_size", self.world_size))
        if old != (self.batch_size, self.world_size):
            seen = batch * old[0] * old[1]
            batch = seen // (self.batch_size * self.world_size)
            log.warning("loader state saved with batch_size=%d, world_size=%d; resuming epoch %d "
                        "at batch %d (approximate: the file order per rank differs)",
                        old[0], old[1], epoch, batch)
        for key in ("seed", "num_files"):
            if key in state and state[key] != getattr(self, key):
                log.warning("loader state has %s=%s but this loader has %s: the resumed order "
                            "will differ", key, state[key], getattr(self, key))
        self.epoch, self.batch = epoch, min(batch, len(self))

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.epoch, self.batch
        for i, (images, labels) in enumerate(self._iter_epoch(epoch, start)):
            self.batch = start + i + 1
            yield (images, labels) if self.with_labels else images
        self._end_epoch(epoch)

    def _end_epoch(self, epoch: int) -> None:
        n_run = len(self._runtime_skipped)
        if self.skipped or n_run:
            log.warning("epoch %d: %d unreadable image(s) skipped (%d found before training, %d "
                        "while decoding; each named above)", epoch, len(self.skipped) + n_run,
                        len(self.skipped), n_run)
        self.epoch, self.batch = epoch + 1, 0

    def _report_unreadable(self, errors: list[str]) -> None:
        """One warning line per file that failed to decode ("path: why"), once per run."""
        for err in errors:
            path = err.split(": ", 1)[0]
            if path not in self._runtime_skipped:
                log.warning("skipping unreadable image %s", err)
                self._runtime_skipped[path] = err

    @abstractmethod
    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) batches of ``epoch`` from batch index ``start`` on."""

    def _batch_ranges(self, order: list[int], start: int) -> Iterator[list[int]]:
        for b in range(start, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


# ---------------------------------------------------------------- PIL / torch DataLoader
class _Samples(Dataset):
    """Decode + augment one (epoch, file index) key; unreadable files come back as errors."""

    def __init__(self, images: ImageList, img_size: int, seed: int, scale: tuple[float, float],
                 strict: bool) -> None:
        self.paths, self.img_size, self.seed = images.paths, img_size, seed
        self.scale, self.strict = scale, strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int, str | None]:
        epoch, idx = key
        img, reason = load_rgb_or_reason(self.paths[idx], self.strict)
        if img is None:
            return None, idx, reason
        box, flip = sample_params(img.width, img.height, self.seed, epoch, idx, self.scale)
        return augment_pil(img, self.img_size, box, flip), idx, None


def _collate(items: list, img_size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    good = [(t, i) for t, i, err in items if err is None]
    errors = [err for _, _, err in items if err is not None]
    if good:
        images = torch.stack([t for t, _ in good])
    else:
        images = torch.empty(0, 3, img_size, img_size, dtype=torch.uint8)
    return images, torch.tensor([i for _, i in good], dtype=torch.long), errors


class _EpochBatches(Sampler):
    """Batches of (epoch, file index) keys, set by the loader before each pass (no back reference,
    so a dropped loader shuts its workers down at once)."""

    def __init__(self) -> None:
        self.epoch, self.batches = 0, []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for idx in self.batches:
            yield [(self.epoch, i) for i in idx]

    def __len__(self) -> int:
        return len(self.batches)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class PILLoader(Loader):
    """torch DataLoader with worker processes decoding with Pillow (uint8 batches, normalized on
    ``device``)."""

    kind = "pil"

    def __init__(self, images: ImageList, batch_size: int, img_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 strict: bool = False, num_workers: int = 0, with_labels: bool = False,
                 dtype: torch.dtype = torch.float32, shuffle: bool = True, drop_last: bool = False,
                 scale: tuple[float, float] = SCALE, prefetch_factor: int = 4) -> None:
        super().__init__(batch_size, seed, rank, world_size, drop_last, with_labels, len(images),
                         device, dtype)
        self.images, self.img_size, self.shuffle = images, img_size, shuffle
        self.skipped = list(images.skipped)
        self._labels = torch.tensor(images.labels, dtype=torch.long)
        self._sampler = _EpochBatches()
        workers = max(0, int(num_workers))
        self._dl = DataLoader(
            _Samples(images, img_size, seed, scale, strict), batch_sampler=self._sampler,
            num_workers=workers, collate_fn=functools.partial(_collate, img_size=img_size),
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if workers else None,
            persistent_workers=workers > 0, prefetch_factor=prefetch_factor if workers else None)

    def order(self, epoch: int) -> list[int]:
        """This rank's file indices for ``epoch``."""
        return epoch_order(self.num_files, self.seed, epoch, self.rank, self.world_size,
                           self.shuffle)

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.epoch = epoch
        self._sampler.batches = list(self._batch_ranges(self.order(epoch), start))
        for images, idx, errors in self._dl:
            self._report_unreadable(errors)
            if len(images) == 0:
                continue
            images = normalize(images.to(self.device, non_blocking=True), self.dtype)
            yield images, self._labels[idx].to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl._iterator = None


# ---------------------------------------------------------------- synthetic
class SyntheticLoader(Loader):
    """Device-resident random images (one pre-generated batch, yielded every step) for benchmarks."""

    kind = "synthetic"

    def __init__(self, batch_size: int, img_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, with_labels: bool = False,
                 num_batches: int = 100) -> None:
        super().__init__(batch_size, seed, rank, world_size, False, with_labels,
                         num_batches * batch_size * world_size, device, dtype)
        g = torch.Generator(device=self.device)
        g.manual_seed(seed * 1000003 + rank)
        self._images = torch.randn(batch_size, 3, img_size, img_size, generator=g,
                                   device=self.device, dtype=torch.float32).to(dtype)
        self._labels = torch.zeros(batch_size, dtype=torch.long, device=self.device)

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(start, len(self)):
            yield self._images, self._labels


# ---------------------------------------------------------------- entry point
def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is visible, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def _scan(source: str | os.PathLike, strict: bool, verify: str, rank: int, world_size: int
          ) -> ImageList:
    """Scan the files; under torch.distributed rank 0 goes first so the others hit its cache."""
    dist = torch.distributed
    coordinated = world_size > 1 and dist.is_available() and dist.is_initialized()
    if coordinated and rank != 0:
        dist.barrier()
    try:
        return scan_images(source, strict=strict, verify=verify)
    finally:
        if coordinated and rank == 0:
            dist.barrier()


def build_loader(source: str | os.PathLike | None = "demo", kind: str = "auto",
                 batch_size: int = 64, img_size: int = 224, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str | None = None,
                 strict: bool = False, num_workers: int | None = None, with_labels: bool = False,
                 dtype: torch.dtype = torch.float32, shuffle: bool = True, drop_last: bool = False,
                 scale: tuple[float, float] = SCALE, verify: str = "fast",
                 num_batches: int = 100) -> Loader:
    """Build a loader of MAE-augmented, normalized batches.

    source: a folder (flat or ImageFolder), a text file of image paths, or "demo".
    kind: "auto" (DALI on a CUDA device when installed, else PIL), "dali", "pil" or "synthetic"
    (ignores ``source``; ``num_batches`` per epoch). verify: pre-scan of the files, "fast"
    (headers + truncation check), "full" (decode every file) or "none".
    strict: stop at the first unreadable file instead of skipping it with a warning.
    num_workers: DataLoader workers (pil) or DALI threads; default min(8, CPU count).
    """
    global _AUTO_LOGGED
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dev = torch.device(device) if device is not None else default_device()
    if kind == "synthetic":
        return SyntheticLoader(batch_size, img_size, seed, rank, world_size, dev, dtype,
                               with_labels, num_batches)
    from . import dali_loader

    if kind == "auto":
        kind = "dali" if dev.type == "cuda" and dali_loader.dali_available() else "pil"
        if not _AUTO_LOGGED:
            if kind == "dali":
                why = f"DALI, decoding on {dev}"
            elif dev.type == "cuda":
                why = "PIL workers (DALI is not installed: pip install nvidia-dali-cuda130)"
            else:
                why = "PIL workers (no CUDA device)"
            log.info("data loader: %s", why)
            _AUTO_LOGGED = True
    if kind == "dali":
        dali_loader.require_dali()
    if source is None:
        raise ValueError("source is required for the dali and pil loaders (a folder, a list "
                         "file or 'demo')")
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    images = _scan(source, strict, verify, rank, world_size)
    if with_labels and all(lab < 0 for lab in images.labels):
        raise ValueError(f"with_labels=True but {str(source)!r} has no labels (use an ImageFolder "
                         f"tree with one sub-folder per class, or a list file with TAB labels)")
    common = dict(seed=seed, rank=rank, world_size=world_size, device=dev, strict=strict,
                  with_labels=with_labels, dtype=dtype, shuffle=shuffle, drop_last=drop_last,
                  scale=scale)
    if kind == "dali":
        return dali_loader.DALILoader(images, batch_size, img_size, num_threads=max(1, workers),
                                      **common)
    return PILLoader(images, batch_size, img_size, num_workers=workers, **common)

"""The interface every data loader implements (PIL, DALI, nvJPEG, synthetic, labelled): the
:class:`Loader` position logic (epoch, batch, resume, bad-file report), the per-epoch file order and
the torch DataLoader plumbing shared by the loaders that decode in worker processes.

Order and sharding: each epoch the file list is permuted with ``torch.randperm`` seeded by
``seed + epoch`` (as DistributedSampler does) and rank ``r`` takes ``perm[r::world_size]``, so every
readable file is read exactly once per epoch across ranks and shards differ by at most one file.
``drop_last=False`` (default) keeps every file: the last batch of a rank may be smaller, and in the
rare case where shard sizes straddle a batch boundary one rank runs one batch more.
``drop_last=True`` (use it for DDP training) gives every rank ``(num_files // world_size) //
batch_size`` full batches and leaves the remaining files out of that epoch (a different few each
epoch). Loaders draw nothing from the global RNGs, so a resumed run keeps the uninterrupted run's
RNG states.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import random
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mae_fast.errors import NoReadableImagesError

log = logging.getLogger("mae_fast.data")

T = TypeVar("T")
Shape = Callable[[int], tuple[int, int]]  # epoch -> (image side, per-process batch size)


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
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 shuffle: bool = True, source: str = "") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last, self.with_labels, self.num_files = drop_last, with_labels, num_files
        self.device, self.dtype, self.shuffle = torch.device(device), dtype, shuffle
        self.source = source  # named in errors
        self.epoch, self.batch = 0, 0
        self.skipped: list[tuple[str, str]] = []  # unreadable files found before training
        self._runtime_skipped: dict[str, str] = {}  # ... and while decoding
        self._shape: Shape | None = None  # the (img_size, batch_size) plan per epoch, see follow()

    # ----- shape plan (progressive resolution) -----
    def follow(self, shape: Shape) -> None:
        """Read epoch ``e`` at ``img_size, batch_size = shape(e)`` from now on, the current epoch at once
        (call it before reading or restoring a position: a batch index is kept as it is)."""
        if getattr(self, "img_size", None) is None:
            raise ValueError(f"the {self.kind} loader has no image size to follow a plan with")
        self._shape = shape
        self._apply_plan(self.epoch)

    def _apply_plan(self, epoch: int) -> None:
        """Take the plan's image size and batch size for ``epoch`` (nothing without a plan)."""
        if self._shape is not None:
            img_size, batch_size = self._shape(epoch)
            self._reshape(int(img_size), int(batch_size), epoch)

    def _reshape(self, img_size: int, batch_size: int, epoch: int) -> None:
        """Read ``epoch`` at ``img_size`` px in batches of ``batch_size``; loaders with state that depends on
        them check or rebuild it."""
        if batch_size < 1:
            raise ValueError(f"the planned batch size of epoch {epoch} must be >= 1, got {batch_size}")
        self.img_size, self.batch_size = img_size, batch_size

    # ----- position -----
    def shard_size(self) -> int:
        """Files this rank reads per epoch (before dropping the last partial batch)."""
        n = self.num_files
        return n // self.world_size + (1 if self.rank < n % self.world_size else 0)

    def __len__(self) -> int:
        return self.batches_at(self.batch_size)

    def batches_at(self, batch_size: int) -> int:
        """``len(self)`` in batches of ``batch_size`` (this loader is left as it is)."""
        if self.drop_last:
            return (self.num_files // self.world_size) // batch_size
        return math.ceil(self.shard_size() / batch_size)

    def order(self, epoch: int) -> list[int]:
        """This rank's file indices for ``epoch``."""
        return epoch_order(self.num_files, self.seed, epoch, self.rank, self.world_size,
                           self.shuffle)

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``; a new epoch starts at batch 0, the current one keeps its position."""
        if epoch != self.epoch:
            self.epoch, self.batch = int(epoch), 0
        self._apply_plan(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out: resume yields the batch after it (``img_size``, where
        the loader has one, is informational)."""
        state = {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
                 "batch_size": self.batch_size, "world_size": self.world_size,
                 "num_files": self.num_files, "kind": self.kind}
        if getattr(self, "img_size", None) is not None:
            state["img_size"] = self.img_size
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position; a changed batch size or world size (after the plan's batch size for the saved
        epoch is taken) maps it by samples seen."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        self._apply_plan(epoch)
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
        yielded = 0
        for i, (images, labels) in enumerate(self._iter_epoch(epoch, start)):
            self.batch = start + i + 1
            yielded += 1
            yield (images, labels) if self.with_labels else images
        if start == 0 and yielded == 0 and len(self) > 0:
            where = f" of {self.source!r}" if self.source else ""
            raise NoReadableImagesError(
                f"none of the {self.shard_size()} image file(s){where} read in epoch {epoch} could be "
                f"decoded (each is named in a warning above)")
        self._end_epoch(epoch)

    def _end_epoch(self, epoch: int) -> None:
        n_run = len(self._runtime_skipped)
        if self.skipped or n_run:
            log.warning("epoch %d: %d unreadable image(s) skipped (%d found before training, %d "
                        "while decoding; each named above)", epoch, len(self.skipped) + n_run,
                        len(self.skipped), n_run)
        self.epoch, self.batch = epoch + 1, 0
        self._apply_plan(self.epoch)

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
        """File indices of batches ``start``, ``start + 1``, ... of an epoch's ``order``."""
        for b in range(start, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


# ---------------------------------------------------------------- torch DataLoader plumbing
class EpochBatches(Sampler):
    """Batches of (epoch, file index) keys, or (epoch, file index, image size) when ``size`` is set: the
    worker processes read the epoch's size from the keys. Set by the loader before each pass (no back
    reference, so a dropped loader shuts its workers down at once)."""

    def __init__(self) -> None:
        self.epoch, self.batches, self.size = 0, [], None

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        extra = () if self.size is None else (self.size,)
        for idx in self.batches:
            yield [(self.epoch, i, *extra) for i in idx]

    def __len__(self) -> int:
        return len(self.batches)


def worker_init(_: int) -> None:
    """DataLoader worker start: one intra-op thread per worker process."""
    torch.set_num_threads(1)


def dataloader_seed(seed: int, epoch: int) -> int:
    """Seed of the DataLoader's own generator for ``epoch`` (worker base seeds come from it)."""
    return (int(seed) * 1_000_003 + int(epoch)) % 2**63


class EpochDataLoader:
    """A torch DataLoader over (epoch, file index) keys that never touches the global torch RNG: its
    generator is reseeded from (seed, epoch) before each pass, so creating an iterator mid-epoch after
    a resume leaves the RNG states a checkpoint holds as the uninterrupted run has them."""

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list], Any], seed: int,
                 num_workers: int, pin_memory: bool, prefetch_factor: int = 4) -> None:
        self.seed = seed
        self.sampler = EpochBatches()
        workers = max(0, int(num_workers))
        self.dataloader = DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate_fn,
            pin_memory=pin_memory, worker_init_fn=worker_init if workers else None,
            persistent_workers=workers > 0, generator=torch.Generator(),
            prefetch_factor=prefetch_factor if workers else None)

    def run(self, epoch: int, batches: list[list[int]], size: int | None = None) -> Iterator[Any]:
        """Collated batches of ``epoch`` for the given file-index batches, in order; with ``size`` the
        keys are (epoch, index, size)."""
        self.sampler.epoch, self.sampler.batches, self.sampler.size = epoch, batches, size
        self.dataloader.generator.manual_seed(dataloader_seed(self.seed, epoch))
        return iter(self.dataloader)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataloader._iterator = None


# ---------------------------------------------------------------- prefetching
def prefetched(produce: Callable[[int], T], n: int, device: torch.device, depth: int = 1
               ) -> Iterator[T]:
    """``produce(0), ..., produce(n - 1)`` in order, each made by a background thread while the
    caller works on the previous one (at most ``depth`` batches ahead). On CUDA the thread queues its
    work on a side stream; the caller's stream waits on an event before a batch is handed out, and its
    tensors are marked as used there. An exception in ``produce`` is raised in the caller; leaving
    the loop early stops the thread."""
    if n <= 0:
        return
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device=device) if cuda else None
    slots, ready = threading.Semaphore(max(1, depth)), queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            for b in range(n):
                slots.acquire()
                if stop.is_set():
                    return
                if cuda:
                    with torch.cuda.device(device), torch.cuda.stream(stream):
                        item = produce(b)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    item, event = produce(b), None
                ready.put((item, event, None))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, raised there
            ready.put((None, None, e))

    thread = threading.Thread(target=work, name="mae-prefetch", daemon=True)
    thread.start()
    try:
        for _ in range(n):
            item, event, error = ready.get()
            if error is not None:
                raise error
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in item if isinstance(item, tuple) else (item,):
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(current)
            slots.release()
            yield item
    finally:
        stop.set()
        slots.release()
        thread.join()


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy and python RNGs for the block, then put their states back. Only the CPU
    generator: ``torch.manual_seed`` would also reseed (and never restore) every CUDA generator, and formats a stack
    trace on each call (about 1 ms a sample)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of (run seed, epoch, sample index) only."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % 2**63


def default_workers() -> int:
    """Loader workers: the cores this process may use (at most 8)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))

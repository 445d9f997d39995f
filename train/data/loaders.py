"""Data loading for MAE pretraining: one entry point (:func:`build_loader`) over a PIL/DataLoader
loader, a DALI loader and an nvJPEG loader (GPU decode) and a synthetic device-resident loader.

Every loader yields ImageNet-normalized images (N, 3, size, size) on ``device`` (or
``(images, labels)`` with ``with_labels=True``) and has ``len``, ``set_epoch`` and a position
(``state_dict``/``load_state_dict``: epoch and batch index) to resume mid-epoch exactly; the
interface, file order and sharding are in :mod:`mae_fast.train.data.loader_base`. Crop and flip of a
sample are drawn from (seed, epoch, file index), so results do not depend on the loader, workers,
sharding or the resume point.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import torch
from torch.utils.data import Dataset

from . import dali_loader, nvjpeg_loader
from .labelled import collate_labelled
from .loader_base import EpochDataLoader, Loader, default_workers
from .shards import is_shard_source
from .sources import ImageList, scan_source
from .transforms import SCALE, augment_pil, load_rgb_or_reason, normalize, sample_params

log = logging.getLogger("mae_fast.data")

KINDS = ("auto", "dali", "nvjpeg", "pil", "synthetic")
_AUTO_LOGGED = False


# ---------------------------------------------------------------- PIL / torch DataLoader
class _Samples(Dataset):
    """Decode + augment one (epoch, file index, image size) key; unreadable files come back as errors."""

    def __init__(self, images: ImageList, seed: int, scale: tuple[float, float], strict: bool) -> None:
        self.paths, self.seed, self.scale, self.strict = images.paths, seed, scale, strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor | None, int, str | None]:
        epoch, idx, size = key
        img, reason = load_rgb_or_reason(self.paths[idx], self.strict)
        if img is None:
            return None, idx, reason
        box, flip = sample_params(img.width, img.height, self.seed, epoch, idx, self.scale)
        return augment_pil(img, size, box, flip), idx, None


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
                         device, dtype, shuffle, images.root)
        self.images, self.img_size = images, img_size
        self.skipped = list(images.skipped)
        self._labels = torch.tensor(images.labels, dtype=torch.long)
        self._dl = EpochDataLoader(_Samples(images, seed, scale, strict), collate_labelled, seed,
                                   num_workers, pin_memory=self.device.type == "cuda",
                                   prefetch_factor=prefetch_factor)

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = list(self._batch_ranges(self.order(epoch), start))
        for images, idx, errors in self._dl.run(epoch, batches, self.img_size):  # workers see the size
            self._report_unreadable(errors)
            if images is None:
                continue
            images = normalize(images.to(self.device, non_blocking=True), self.dtype)
            yield images, self._labels[idx].to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        self._dl.close()


# ---------------------------------------------------------------- synthetic
class SyntheticLoader(Loader):
    """Device-resident random images (one pre-generated batch, yielded every step) for benchmarks; an
    epoch is ``num_batches`` batches of the construction-time batch size (fewer at a larger planned one)."""

    kind = "synthetic"

    def __init__(self, batch_size: int, img_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, with_labels: bool = False,
                 num_batches: int = 100) -> None:
        super().__init__(batch_size, seed, rank, world_size, False, with_labels,
                         num_batches * batch_size * world_size, device, dtype, source="synthetic")
        self.img_size = img_size
        self._images, self._labels = self._generate()

    def _generate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current size and batch size, from a generator seeded by (seed, rank)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1000003 + self.rank)
        images = torch.randn(self.batch_size, 3, self.img_size, self.img_size, generator=g,
                             device=self.device, dtype=torch.float32).to(self.dtype)
        return images, torch.zeros(self.batch_size, dtype=torch.long, device=self.device)

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._images.shape != (self.batch_size, 3, self.img_size, self.img_size):
            self._images, self._labels = self._generate()
        for _ in range(start, len(self)):
            yield self._images, self._labels


# ---------------------------------------------------------------- entry point
def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is visible, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def resolve_kind(kind: str, device: torch.device) -> str:
    """The loader ``kind`` names; "auto" is DALI where installed on a CUDA device, else the nvJPEG
    loader on a CUDA device whose torchvision decodes JPEG there, else PIL (said once per process)."""
    global _AUTO_LOGGED
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    if device.type != "cuda":
        kind, why = "pil", "PIL workers (no CUDA device)"
    elif dali_loader.dali_available():
        kind, why = "dali", f"DALI, decoding on {device}"
    else:
        problem = nvjpeg_loader.nvjpeg_problem(device)
        if problem is None:
            kind, why = "nvjpeg", f"torchvision nvJPEG, decoding on {device} (DALI is not installed)"
        else:
            kind, why = "pil", f"PIL workers (DALI is not installed; GPU decoding unavailable: {problem})"
    if not _AUTO_LOGGED:
        log.info("data loader: %s", why)
        _AUTO_LOGGED = True
    return kind


def build_loader(source: str | os.PathLike | None = "demo", kind: str = "auto",
                 batch_size: int = 64, img_size: int = 224, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str | None = None,
                 strict: bool = False, num_workers: int | None = None, with_labels: bool = False,
                 dtype: torch.dtype = torch.float32, shuffle: bool = True, drop_last: bool = False,
                 scale: tuple[float, float] = SCALE, verify: str = "fast",
                 num_batches: int = 100, shard_streams: int = 0, shard_block: int = 1000) -> Loader:
    """Build a loader of MAE-augmented, normalized batches.

    source: a folder (flat or ImageFolder), a text file of image paths, or "demo"; or tar shards
    (WebDataset layout: a brace pattern, a folder of .tar files or a list of them), read by the pil
    or dali loader in ``shard_streams`` streams (0: one per rank) shuffled in blocks of
    ``shard_block`` samples (see :mod:`.shards`).
    kind: "auto" (see :func:`resolve_kind`), "dali", "nvjpeg" (torchvision decode_jpeg on
    ``device``; on a CPU device the same code decodes on the CPU), "pil" or "synthetic" (ignores
    ``source``; ``num_batches`` per epoch). verify: pre-scan of the files, "fast" (headers +
    truncation check), "full" (decode every file) or "none".
    strict: stop at the first unreadable file instead of skipping it with a warning.
    num_workers: DataLoader workers (pil), DALI threads or file-reading threads (nvjpeg); default
    min(8, CPU count).
    """
    dev = torch.device(device) if device is not None else default_device()
    requested, kind = kind, resolve_kind(kind, dev)
    if kind == "synthetic":
        return SyntheticLoader(batch_size, img_size, seed, rank, world_size, dev, dtype,
                               with_labels, num_batches)
    if kind == "dali":
        dali_loader.require_dali()
    if source is None:
        raise ValueError(f"source is required for the {kind} loader (a folder, a list file or "
                         f"'demo')")
    workers = default_workers() if num_workers is None else num_workers
    if is_shard_source(source):
        from .shard_loaders import build_shard_loader

        if kind == "nvjpeg" and requested == "auto":  # nvjpeg reads folders: shards go to PIL
            kind = "pil"
        return build_shard_loader(str(source), kind, batch_size, img_size, seed=seed, rank=rank,
                                  world_size=world_size, device=dev, strict=strict, num_workers=workers,
                                  with_labels=with_labels, dtype=dtype, shuffle=shuffle, drop_last=drop_last,
                                  scale=scale, verify=verify, streams=shard_streams, block=shard_block)
    images = scan_source(source, strict, verify, rank, world_size)
    if with_labels and all(lab < 0 for lab in images.labels):
        raise ValueError(f"with_labels=True but {str(source)!r} has no labels (use an ImageFolder "
                         f"tree with one sub-folder per class, or a list file with TAB labels)")
    common = dict(seed=seed, rank=rank, world_size=world_size, device=dev, strict=strict,
                  with_labels=with_labels, dtype=dtype, shuffle=shuffle, drop_last=drop_last,
                  scale=scale)
    if kind == "dali":
        return dali_loader.DALILoader(images, batch_size, img_size, num_threads=max(1, workers),
                                      **common)
    if kind == "nvjpeg":
        return nvjpeg_loader.NvJPEGLoader(images, batch_size, img_size,
                                          num_threads=max(1, workers), **common)
    return PILLoader(images, batch_size, img_size, num_workers=workers, **common)

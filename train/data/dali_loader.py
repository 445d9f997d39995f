"""NVIDIA DALI loader: fn.readers.file -> fn.decoders.image_slice (the crop decoded as a region of
interest; "mixed" = GPU decode, or CPU operators with device_id=None on a machine without a GPU)
-> bicubic fn.resize -> fn.crop_mirror_normalize. DALI is imported lazily (optional dependency).

Order, sharding and crop boxes are computed in Python by the same functions as the other loaders
(:func:`mae_fast.train.data.loader_base.epoch_order`,
:func:`mae_fast.train.data.transforms.sample_params_batch`) and fed to the pipeline, so both loaders
read the same files with the same crops, and a pipeline built for the rest of an epoch resumes it
exactly. The reader therefore gets this rank's file list (already sharded: shard_id=0, num_shards=1)
and a new pipeline is built at the start of each epoch.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Any, Iterator

import numpy as np
import torch

from .loader_base import Loader
from .sources import ImageList
from .transforms import IMAGENET_MEAN, IMAGENET_STD, SCALE, sample_params_batch

log = logging.getLogger("mae_fast.data")

DALI_PIP = "nvidia-dali-cuda130"


def dali_available() -> bool:
    """True when ``nvidia.dali`` can be imported."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def require_dali() -> None:
    """Raise a clear ImportError when DALI is missing."""
    if not dali_available():
        raise ImportError(f"kind='dali' needs NVIDIA DALI: pip install {DALI_PIP} (CUDA 13; "
                          f"nvidia-dali-cuda120 for CUDA 12), or use kind='pil'")


class _CropSource:
    """external_source callback: crop starts/shapes (x, y), (w, h) and mirror flags of batch i."""

    def __init__(self, files: list[int], sizes: np.ndarray, seed: int, epoch: int,
                 batch_size: int, scale: tuple[float, float]) -> None:
        self.files, self.sizes, self.seed, self.epoch = files, sizes, seed, epoch
        self.batch_size, self.scale = batch_size, scale
        self.num_batches = max(1, -(-len(files) // batch_size))

    def __call__(self, info: Any) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        b = info.iteration % self.num_batches  # prefetch may run past the epoch's end
        idx = self.files[b * self.batch_size:(b + 1) * self.batch_size]
        idx = idx + [idx[-1]] * (self.batch_size - len(idx))  # the reader pads with the last file
        idx_arr = np.asarray(idx)
        wh = self.sizes[idx_arr]
        boxes, flips = sample_params_batch(wh[:, 0], wh[:, 1], self.seed, self.epoch, idx_arr,
                                           self.scale)
        starts = [np.array([l, t], dtype=np.int32) for t, l, _, _ in boxes]
        shapes = [np.array([w, h], dtype=np.int32) for _, _, h, w in boxes]
        mirror = [np.array(int(f), dtype=np.int32) for f in flips]
        return starts, shapes, mirror


def decode_crop_normalize(data: Any, start: Any, shape: Any, mirror: Any, img_size: int, gpu: bool) -> Any:
    """Pipeline graph from encoded images to the batch (shared with the tar-shard DALI loader): the crop
    decoded as a region of interest, bicubic resize, flip, ImageNet normalization (CHW float)."""
    from nvidia.dali import fn, types

    # nvJPEG buffer paddings sized for ImageNet-like JPEGs avoid re-allocations
    pads = dict(device_memory_padding=211025920, host_memory_padding=140544512) if gpu else {}
    images = fn.decoders.image_slice(data, start=start, shape=shape, axis_names="WH",
                                     device="mixed" if gpu else "cpu",
                                     output_type=types.RGB, adjust_orientation=False, **pads)
    images = fn.resize(images, size=[img_size, img_size], interp_type=types.INTERP_CUBIC,
                       antialias=True)
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT,
                                    output_layout="CHW",
                                    mean=[m * 255.0 for m in IMAGENET_MEAN],
                                    std=[s * 255.0 for s in IMAGENET_STD])


def _build_pipeline(paths: list[str], source: _CropSource, batch_size: int, img_size: int,
                    num_threads: int, device_id: int | None, seed: int) -> Any:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def mae_pipeline() -> Any:
        data, _ = fn.readers.file(files=paths, name="Reader", random_shuffle=False,
                                  shard_id=0, num_shards=1, pad_last_batch=True)
        start, shape, mirror = fn.external_source(source=source, num_outputs=3, batch=True,
                                                  batch_info=True)
        return decode_crop_normalize(data, start, shape, mirror, img_size, device_id is not None)

    pipe = mae_pipeline()
    pipe.build()
    return pipe


class DALILoader(Loader):
    """DALI pipeline per epoch; output on ``device`` (GPU decode when it is a CUDA device)."""

    kind = "dali"

    def __init__(self, images: ImageList, batch_size: int, img_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 strict: bool = False, num_threads: int = 4, with_labels: bool = False,
                 dtype: torch.dtype = torch.float32, shuffle: bool = True, drop_last: bool = False,
                 scale: tuple[float, float] = SCALE) -> None:
        require_dali()
        super().__init__(batch_size, seed, rank, world_size, drop_last, with_labels, len(images),
                         device, dtype, shuffle, images.root)
        if any(w <= 0 for w, _ in images.sizes):
            raise ValueError("the DALI loader needs image sizes from the pre-scan: use "
                             "verify='fast' or 'full', not 'none'")
        self.images, self.img_size, self.scale = images, img_size, scale
        self.num_threads, self.strict = num_threads, strict
        self.skipped = list(images.skipped)
        self._sizes = np.asarray(images.sizes, dtype=np.int64).reshape(-1, 2)
        self._labels = torch.tensor(images.labels, dtype=torch.long)
        if self.device.type == "cuda":
            self.device_id: int | None = (self.device.index if self.device.index is not None
                                          else torch.cuda.current_device())
        else:
            self.device_id = None

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        batches = list(self._batch_ranges(self.order(epoch), start))
        files = [i for b in batches for i in b]
        if not files:
            return
        source = _CropSource(files, self._sizes, self.seed, epoch, self.batch_size, self.scale)
        pipe = _build_pipeline([self.images.paths[i] for i in files], source, self.batch_size,
                               self.img_size, self.num_threads, self.device_id,
                               (self.seed * 7919 + epoch) % (2 ** 31))
        it = None
        try:
            for idx in batches:
                try:
                    if it is None:  # the constructor already runs the first batch
                        it = DALIGenericIterator([pipe], ["images"], reader_name="Reader",
                                                 auto_reset=False,
                                                 last_batch_policy=LastBatchPolicy.PARTIAL)
                    out = next(it)
                except StopIteration:
                    return
                except RuntimeError as e:
                    names = ", ".join(self.images.paths[i] for i in idx)
                    raise RuntimeError(f"DALI failed on a batch of epoch {epoch} (one of: {names})"
                                       f": {e}. Pre-scan with verify='full' to find unreadable "
                                       f"files, or use kind='pil'.") from e
                images = out[0]["images"].to(self.device, non_blocking=True)
                labels = self._labels[idx].to(self.device, non_blocking=True)
                yield images.to(self.dtype), labels
        finally:
            del it, pipe

"""Loaders over tar shards (WebDataset layout), with the reading order of :mod:`.shards`:

* :class:`ShardPILLoader`: the main process streams this rank's blocks with webdataset's tar
  iterator and hands the encoded bytes to DataLoader workers, which decode with Pillow and apply
  the MAE augmentation (pretraining) or a torchvision/timm transform (fine-tuning, evaluation).
* :class:`ShardDALILoader`: DALI's ``fn.readers.webdataset``, one reader per stream this rank
  reads, fed index files written for the epoch (the blocks in order, from the resume point on), then
  the same crop-as-ROI decode (GPU "mixed" on CUDA, CPU operators without a GPU) as for folders.

Crops and flips are drawn from (seed, epoch, sample id) as for folders, so both loaders give the
same batches, and a loader resumed at batch b reads nothing before it (position = shard + offset).
"""
from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mae_fast.errors import STRICT_DATA_HINT, ShardError, UnreadableImageError

from .loader_base import EpochDataLoader, Loader, sample_seed, seeded_rngs
from .shards import (DEFAULT_BLOCK, Block, ShardSet, block_gids, decode_bytes, rank_streams, read_blocks,
                     resolve_streams, scan_shards, skip_items, stream_blocks)
from .transforms import SCALE, augment_pil, normalize, sample_params

log = logging.getLogger("mae_fast.data")

SampleFn = Callable[..., torch.Tensor]  # (image, epoch, sample id[, image size]) -> tensor


class MAEAugment:
    """Pretraining sample: RandomResizedCrop + flip drawn from (seed, epoch, sample id), uint8, resized to
    ``size`` px (default ``img_size``)."""

    def __init__(self, img_size: int, seed: int, scale: tuple[float, float] = SCALE) -> None:
        self.img_size, self.seed, self.scale = img_size, seed, scale

    def __call__(self, img: Image.Image, epoch: int, gid: int, size: int | None = None) -> torch.Tensor:
        box, flip = sample_params(img.width, img.height, self.seed, epoch, gid, self.scale)
        return augment_pil(img, size or self.img_size, box, flip)


class SeededTransform:
    """Fine-tuning / evaluation sample: ``transform`` under RNGs seeded by (seed, epoch, sample id)."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], seed: int) -> None:
        self.transform, self.seed = transform, seed

    def __call__(self, img: Image.Image, epoch: int, gid: int) -> torch.Tensor:
        with seeded_rngs(sample_seed(self.seed, epoch, gid)):
            return self.transform(img)


def _rows_from(rank_items: list[np.ndarray]) -> np.ndarray:
    """Interleave the rank's streams: local row k is item k // K of stream k % K."""
    rows = np.empty(sum(len(x) for x in rank_items), dtype=np.int64)
    for m, x in enumerate(rank_items):
        rows[m::len(rank_items)] = x
    return rows


class _ShardLoader(Loader):
    """Position and order over a ShardSet (see :mod:`.shards`): this rank's streams, interleaved."""

    def __init__(self, shards: ShardSet, batch_size: int, *, seed: int, rank: int, world_size: int,
                 device: torch.device | str, with_labels: bool, dtype: torch.dtype, shuffle: bool,
                 drop_last: bool, streams: int, block: int) -> None:
        super().__init__(batch_size, seed, rank, world_size, drop_last, with_labels, len(shards), device,
                         dtype, shuffle, source=shards.root)
        if block < 1:
            raise ValueError(f"the shuffle block must be >= 1 sample, got {block}")
        self.images = shards  # what the training commands read classes and labels from
        self.streams, self.block = resolve_streams(streams, world_size, len(shards)), block
        self.skipped = list(shards.skipped)
        self._labels = torch.from_numpy(shards.labels_arr)

    def rows_per_epoch(self) -> int:
        """Samples this rank reads per epoch (after drop_last)."""
        return len(self) * self.batch_size if self.drop_last else self.shard_size()

    def stream_plan(self, epoch: int, start: int) -> list[list[Block]]:
        """Per stream of this rank, its blocks from batch ``start`` of ``epoch`` on."""
        mine = rank_streams(self.rank, self.world_size, self.streams)
        first_row, k = start * self.batch_size, len(mine)
        return [skip_items(stream_blocks(self.images, self.seed, epoch, self.streams, v, self.block,
                                         self.shuffle), max(0, -(-(first_row - m) // k)))
                for m, v in enumerate(mine)]

    def order(self, epoch: int) -> list[int]:
        """Sample ids this rank reads in ``epoch``, in order (before drop_last)."""
        return _rows_from([block_gids(self.images, b) for b in self.stream_plan(epoch, 0)]).tolist()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(streams=self.streams, block=self.block, shards=len(self.images.shards))
        plan = self.stream_plan(self.epoch, self.batch) if self.batch < len(self) else []
        state["position"] = [{"shard": Path(self.images.shards[b[0].shard]).name, "sample": b[0].first}
                             for b in plan if b]  # informational: where each stream goes on
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As for folders; with the same streams and global batch on another number of processes the
        global order is the same, so the position is exact."""
        self._apply_plan(int(state["epoch"]))  # compare with the batch size of the saved epoch
        for key in ("streams", "block"):
            if key in state and state[key] != getattr(self, key):
                log.warning("loader state has %s=%s but this loader has %s: the resumed order will "
                            "differ", key, state[key], getattr(self, key))
        old = (state.get("batch_size", self.batch_size), state.get("world_size", self.world_size))
        if (old != (self.batch_size, self.world_size) and state.get("streams") == self.streams
                and old[0] * old[1] == self.batch_size * self.world_size):
            log.info("loader state saved on %d process(es) x %d images; resuming the same global order "
                     "on %d x %d (%d data streams)", old[1], old[0], self.world_size, self.batch_size,
                     self.streams)
            state = {**state, "batch_size": self.batch_size, "world_size": self.world_size}
        super().load_state_dict(state)


# ---------------------------------------------------------------- PIL
class _ShardSamples(Dataset):
    """Decode one (epoch, (sample id, name, bytes)[, image size]) key and apply ``make`` (given the size
    when the key has one); failures come back as "name: why" errors (or raise with ``strict``)."""

    def __init__(self, make: SampleFn, strict: bool) -> None:
        self.make, self.strict = make, strict

    def __len__(self) -> int:
        return 0  # keys carry their data: the sampler decides what is read

    def __getitem__(self, key: tuple[Any, ...]) -> tuple[torch.Tensor | None, int, str | None]:
        epoch, (gid, name, data), *size = key
        try:
            img = decode_bytes(data)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported, never silent
            if self.strict:
                raise UnreadableImageError(f"unreadable image {name}: {e} ({STRICT_DATA_HINT})") from e
            return None, gid, f"{name}: {e}"
        return self.make(img, epoch, gid, *size), gid, None


def _collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    good = [(t, i) for t, i, err in items if err is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), [e for _, _, e in items if e]


class _Batches:
    """``count`` batches of ``size`` records pulled lazily from ``records`` (reading happens as the
    DataLoader asks for the next batch)."""

    def __init__(self, count: int, records: Iterable[Any], size: int) -> None:
        self.count, self.records, self.size = count, records, size

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[list[Any]]:
        it = iter(self.records)
        for _ in range(self.count):
            batch = list(itertools.islice(it, self.size))
            if not batch:
                return
            yield batch


class ShardPILLoader(_ShardLoader):
    """Shards read with webdataset in this process, decoded by DataLoader workers with Pillow; with the
    MAE augmentation it has an ``img_size``, handed to the workers in each epoch's keys."""

    kind = "pil"

    def __init__(self, shards: ShardSet, batch_size: int, make: SampleFn, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", strict: bool = False,
                 num_workers: int = 0, with_labels: bool = False, dtype: torch.dtype = torch.float32,
                 shuffle: bool = True, drop_last: bool = False, streams: int = 0,
                 block: int = DEFAULT_BLOCK) -> None:
        super().__init__(shards, batch_size, seed=seed, rank=rank, world_size=world_size, device=device,
                         with_labels=with_labels, dtype=dtype, shuffle=shuffle, drop_last=drop_last,
                         streams=streams, block=block)
        self._dl = EpochDataLoader(_ShardSamples(make, strict), _collate, seed, num_workers,
                                   pin_memory=self.device.type == "cuda")
        self.img_size: int | None = getattr(make, "img_size", None)  # None: the transform sets it

    def _records(self, epoch: int, start: int) -> Iterator[tuple[int, str, bytes]]:
        ss = self.images
        readers = [read_blocks(ss, blocks) for blocks in self.stream_plan(epoch, start)]
        for k in range(start * self.batch_size, self.rows_per_epoch()):
            gid, data = next(readers[k % len(readers)])
            yield gid, ss.name(gid), data

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = _Batches(len(self) - start, self._records(epoch, start), self.batch_size)
        for images, gids, errors in self._dl.run(epoch, batches, self.img_size):  # type: ignore[arg-type]
            self._report_unreadable(errors)
            if images is None:
                continue
            images = images.to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = normalize(images, self.dtype)
            yield images, self._labels[gids].to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the worker processes now."""
        self._dl.close()


# ---------------------------------------------------------------- DALI
def _write_index(path: Path, ss: ShardSet, gids: np.ndarray) -> None:
    """A DALI webdataset index (v1.2) listing the image member of ``gids``, in that order."""
    lines = [f"v1.2 {len(gids)}"]
    lines += [f"img {ss.img_offset[g]} {ss.img_size[g]} s{g}.img" for g in gids.tolist()]
    path.write_text("\n".join(lines) + "\n")


def _take(blocks: list[Block], n: int) -> list[Block]:
    """The first ``n`` items of ``blocks``."""
    out = []
    for b in blocks:
        if n <= 0:
            break
        out.append(b if len(b.perm) <= n else Block(b.shard, b.first, b.perm[:n]))
        n -= len(b.perm)
    return out


class ShardDALILoader(_ShardLoader):
    """DALI ``fn.readers.webdataset`` per stream of this rank; output on ``device``."""

    kind = "dali"

    def __init__(self, shards: ShardSet, batch_size: int, img_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", num_threads: int = 4,
                 with_labels: bool = False, dtype: torch.dtype = torch.float32, shuffle: bool = True,
                 drop_last: bool = False, scale: tuple[float, float] = SCALE, streams: int = 0,
                 block: int = DEFAULT_BLOCK) -> None:
        from .dali_loader import require_dali

        require_dali()
        super().__init__(shards, batch_size, seed=seed, rank=rank, world_size=world_size, device=device,
                         with_labels=with_labels, dtype=dtype, shuffle=shuffle, drop_last=drop_last,
                         streams=streams, block=block)
        self._check_streams(f"--batch-size {batch_size}", batch_size)
        if (shards.wh <= 0).any():
            raise ValueError("the DALI loader needs image sizes from the shard index: use verify='fast' "
                             "or 'full', not 'none'")
        self.img_size, self.scale, self.num_threads = img_size, scale, max(1, num_threads)
        self.device_id: int | None = None
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._tmp = Path(tempfile.mkdtemp(prefix="mae-fast-dali-index-"))
        weakref.finalize(self, shutil.rmtree, str(self._tmp), True)

    def _check_streams(self, what: str, batch_size: int) -> None:
        """ShardError unless ``batch_size`` (named ``what``) splits evenly over this process's streams."""
        k = self.streams // self.world_size
        if batch_size % k:
            raise ShardError(f"the DALI loader reads {k} streams per process ({self.streams} streams, "
                             f"{self.world_size} processes): {what} must be a multiple of {k}")

    def _reshape(self, img_size: int, batch_size: int, epoch: int) -> None:
        self._check_streams(f"the batch size of epoch {epoch} ({batch_size})", batch_size)
        super()._reshape(img_size, batch_size, epoch)

    def _reader_inputs(self, epoch: int, plan: list[Block], n: int, m: int
                       ) -> tuple[list[str], list[str], np.ndarray]:
        """Shard paths, index files and sample ids of stream ``m``'s next ``n`` items; a stream
        shorter than ``n`` repeats its last sample (rows that are dropped after decoding)."""
        ss, blocks = self.images, _take(plan, n)
        groups = [[shard, sum(len(b.perm) for b in grp)]
                  for shard, grp in itertools.groupby(blocks, key=lambda b: b.shard)] or [[0, 0]]
        gids = block_gids(ss, blocks)
        filler = gids[-1] if len(gids) else ss.starts[groups[-1][0]]
        groups[-1][1] += n - len(gids)
        gids = np.concatenate([gids, np.full(n - len(gids), filler, dtype=np.int64)])
        paths, indexes, pos = [], [], 0
        for shard, count in groups:
            index = self._tmp / f"e{epoch}-m{m}-{len(paths)}.idx"
            _write_index(index, ss, gids[pos:pos + count])
            paths.append(ss.shards[shard])
            indexes.append(str(index))
            pos += count
        return paths, indexes, gids

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        plans = self.stream_plan(epoch, start)
        k, first_row = len(plans), start * self.batch_size
        n_rows = self.rows_per_epoch() - first_row
        if n_rows <= 0:
            return
        per_stream = -(-n_rows // k)
        inputs = [self._reader_inputs(epoch, plan, per_stream, m) for m, plan in enumerate(plans)]
        rows = _rows_from([g for _, _, g in inputs])[:n_rows]
        pipe = _build_shard_pipeline(inputs, self.images.wh, self.seed, epoch, self.batch_size // k,
                                     self.img_size, self.scale, self.num_threads, self.device_id)
        it = None
        try:
            for b in range(0, n_rows, self.batch_size):
                idx = rows[b:b + self.batch_size]
                try:
                    if it is None:  # the constructor already runs the first batch
                        it = DALIGenericIterator([pipe], ["images"], reader_name="Reader0", auto_reset=False,
                                                 last_batch_policy=LastBatchPolicy.PARTIAL)
                    out = next(it)
                except StopIteration:
                    return
                except RuntimeError as e:
                    names = ", ".join(self.images.name(int(g)) for g in idx[:8])
                    raise RuntimeError(f"DALI failed on a batch of epoch {epoch} (one of: {names}): {e}. "
                                       f"Index with verify='full' to find unreadable samples, or use "
                                       f"kind='pil'.") from e
                images = out[0]["images"]
                images = images.reshape(-1, *images.shape[-3:])[:len(idx)].to(self.device, non_blocking=True)
                labels = self._labels[torch.from_numpy(idx)].to(self.device, non_blocking=True)
                yield images.to(self.dtype), labels
        finally:
            del it, pipe
            for f in self._tmp.glob(f"e{epoch}-*.idx"):
                f.unlink(missing_ok=True)


def _build_shard_pipeline(inputs: list[tuple[list[str], list[str], np.ndarray]], sizes: np.ndarray,
                          seed: int, epoch: int, batch_size: int, img_size: int, scale: tuple[float, float],
                          num_threads: int, device_id: int | None) -> Any:
    """One webdataset reader + crop source + decode chain per stream; K > 1 streams are stacked so
    that row j * K + m of the output is item j of stream m."""
    from nvidia.dali import fn, pipeline_def

    from .dali_loader import _CropSource, decode_crop_normalize

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=(seed * 7919 + epoch) % (2 ** 31), prefetch_queue_depth=2, exec_dynamic=True)
    def shard_pipeline() -> Any:
        outs = []
        for m, (paths, indexes, gids) in enumerate(inputs):
            data = fn.readers.webdataset(paths=paths, index_paths=indexes, ext=["img"],
                                         missing_component_behavior="error", random_shuffle=False,
                                         pad_last_batch=True, name=f"Reader{m}")
            crops = _CropSource(gids.tolist(), sizes, seed, epoch, batch_size, scale)
            start, shape, mirror = fn.external_source(source=crops, num_outputs=3, batch=True,
                                                      batch_info=True)
            outs.append(decode_crop_normalize(data, start, shape, mirror, img_size, device_id is not None))
        return fn.stack(*outs) if len(outs) > 1 else outs[0]

    pipe = shard_pipeline()
    pipe.build()
    return pipe


# ---------------------------------------------------------------- builders
def build_shard_loader(source: str, kind: str, batch_size: int, img_size: int, *, seed: int = 0,
                       rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                       strict: bool = False, num_workers: int = 0, with_labels: bool = False,
                       dtype: torch.dtype = torch.float32, shuffle: bool = True, drop_last: bool = False,
                       scale: tuple[float, float] = SCALE, verify: str = "fast", streams: int = 0,
                       block: int = DEFAULT_BLOCK) -> Loader:
    """The pretraining (MAE augmentation) loader over tar shards, ``kind`` "pil" or "dali"."""
    if kind not in ("pil", "dali"):
        raise ValueError(f"--loader {kind} reads image folders; tar shards are read by --loader dali or pil")
    shards = scan_shards(source, strict, verify, rank, world_size)
    if with_labels and (shards.labels_arr < 0).all():
        raise ValueError(f"with_labels=True but the shards of {source!r} have no .cls labels (write them "
                         f"with mae-make-shards from an ImageFolder tree)")
    common = dict(seed=seed, rank=rank, world_size=world_size, device=device, with_labels=with_labels,
                  dtype=dtype, shuffle=shuffle, drop_last=drop_last, streams=streams, block=block)
    if kind == "dali":
        return ShardDALILoader(shards, batch_size, img_size, num_threads=num_workers, scale=scale, **common)
    return ShardPILLoader(shards, batch_size, MAEAugment(img_size, seed, scale), strict=strict,
                          num_workers=num_workers, **common)


def build_labelled_shard_loader(shards: ShardSet, transform: Callable[[Any], torch.Tensor], batch_size: int,
                                *, seed: int = 0, rank: int = 0, world_size: int = 1,
                                device: torch.device | str = "cpu", strict: bool = False, num_workers: int = 8,
                                training: bool = True, streams: int = 0, block: int = DEFAULT_BLOCK
                                ) -> ShardPILLoader:
    """Fine-tuning (shuffled, full batches) or evaluation (shard order, every sample once) loader of
    (transformed image, ``.cls`` label) batches."""
    return ShardPILLoader(shards, batch_size, SeededTransform(transform, seed), seed=seed, rank=rank,
                          world_size=world_size, device=device, strict=strict, num_workers=num_workers,
                          with_labels=True, shuffle=training, drop_last=training, streams=streams, block=block)


def scan_labelled_shards(source: str, strict: bool = False, rank: int = 0, world_size: int = 1) -> ShardSet:
    """Index labelled shards; ValueError when a sample has no ``.cls`` label."""
    shards = scan_shards(source, strict, "fast", rank, world_size)
    if (shards.labels_arr < 0).any():
        raise ValueError(f"the shards of {source!r} have no .cls labels: fine-tuning and linear probing need "
                         f"one per sample (mae-make-shards writes them from an ImageFolder tree)")
    return shards


__all__ = ["MAEAugment", "SeededTransform", "ShardPILLoader", "ShardDALILoader", "build_shard_loader",
           "build_labelled_shard_loader", "scan_labelled_shards"]

"""Labelled data for fine-tuning and linear probing: ImageFolder trees (or TAB-labelled list files)
scanned with the pretraining loader's bad-file handling, timm's fine-tune augmentation
(RandAugment, random erasing) and the eval transform (resize 256 -> center crop 224). The linear
probe trains on the pretraining loader (``build_loader(with_labels=True, scale=(0.08, 1))``).

Each sample's augmentation draws from RNGs seeded by (seed, epoch, file index) and the global RNG
states are left untouched, so a batch is the same whatever the workers, sharding or resume point.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .loader_base import EpochBatches, Loader, epoch_order, sample_seed, seeded_rngs, worker_init
from .shards import ShardSet, is_shard_source
from .sources import ImageList, scan_source
from .transforms import IMAGENET_MEAN, IMAGENET_STD, load_rgb_or_reason

log = logging.getLogger("mae_fast.data")

Transform = Callable[[Any], torch.Tensor]


def require_labelled(source: str | os.PathLike) -> None:
    """Raise ValueError unless ``source`` is a folder with class sub-folders or a (list) file."""
    if is_shard_source(source):
        return  # tar shards: every sample's .cls label is checked when they are indexed
    root = Path(source).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data {str(root)!r} does not exist (expected an ImageFolder tree: one "
                                f"sub-folder of images per class)")
    if root.is_dir() and not any(d.is_dir() and not d.name.startswith(".") for d in root.iterdir()):
        raise ValueError(f"data folder {str(root)!r} has no class sub-folders: fine-tuning and linear "
                         f"probing need an ImageFolder tree (one sub-folder of images per class, e.g. "
                         f"{root}/cat/1.jpg), or a list file with a TAB and the label on each line")


def split_sources(data: str, eval_data: str = "") -> Tuple[str, str]:
    """(train, eval) sources: ``data``/train and ``data``/val when both exist (official layout),
    else ``data`` for training and ``eval_data`` (default: the training images, with a warning)."""
    root = Path(data).expanduser()
    for source, flag in ((data, "--data"), (eval_data, "--eval-data")):
        if source and not is_shard_source(source) and not Path(source).expanduser().exists():
            raise FileNotFoundError(f"{flag} {source}: no such file or folder")
    if not eval_data and (root / "train").is_dir() and (root / "val").is_dir():
        return str(root / "train"), str(root / "val")
    if not eval_data:
        log.warning("%s has no train/ and val/ sub-folders and no --eval-data was given: evaluating on "
                    "the training images", data)
        return data, data
    return data, eval_data


def scan_labelled(source: str, strict: bool = False, rank: int = 0, world_size: int = 1) -> ImageList:
    """Scan a labelled source (unreadable files logged and left out); ValueError without labels."""
    if is_shard_source(source):  # tar shards with .cls labels (train/data/shard_loaders.py)
        from .shard_loaders import scan_labelled_shards

        return scan_labelled_shards(source, strict, rank, world_size)  # type: ignore[return-value]
    require_labelled(source)
    images = scan_source(source, strict, "fast", rank, world_size)
    if any(lab < 0 for lab in images.labels):
        raise ValueError(f"{source!r} has images without a label: use an ImageFolder tree (one sub-folder "
                         f"per class) or a list file with a TAB and the label on every line")
    return images


def num_classes_of(images: ImageList) -> int:
    return len(images.classes) if images.classes else max(images.labels) + 1


def check_classes(train: ImageList, evaluation: ImageList, nb_classes: int) -> None:
    """ValueError when labels reach ``nb_classes`` or the two trees name different classes."""
    for images in (train, evaluation):
        if max(images.labels) >= nb_classes:
            raise ValueError(f"{images.root!r} has label {max(images.labels)} but --nb-classes is {nb_classes}")
    if train.classes and evaluation.classes and train.classes != evaluation.classes:
        diff = sorted(set(train.classes) ^ set(evaluation.classes))[:5]
        raise ValueError(f"{train.root!r} and {evaluation.root!r} have different class folders ({len(train.classes)} "
                         f"vs {len(evaluation.classes)}; e.g. {diff}): labels would not match")


def train_transform(img_size: int, auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
                    re_prob: float = 0.25, re_mode: str = "pixel", re_count: int = 1) -> Transform:
    """The official fine-tune augmentation via timm ``create_transform(is_training=True)``:
    RandomResizedCrop (bicubic) + flip + RandAugment + normalize + random erasing."""
    from timm.data import create_transform

    return create_transform(img_size, is_training=True, color_jitter=None,
                            auto_augment=auto_augment or None, interpolation="bicubic",
                            re_prob=re_prob, re_mode=re_mode, re_count=re_count,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def probe_transform(img_size: int, scale: Tuple[float, float] = (0.08, 1.0)) -> Transform:
    """The linear probe's augmentation as a per-sample transform: RandomResizedCrop(``scale``, bicubic)
    + horizontal flip + normalize (the feature probe's augmented views)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(img_size: int, crop_pct: Optional[float] = None) -> Transform:
    """Resize the short side to img_size / crop_pct (bicubic), center crop img_size, normalize;
    crop_pct defaults to 224/256 up to 224 px (resize 256 -> crop 224) and 1.0 above."""
    from timm.data import create_transform

    if crop_pct is None:
        crop_pct = 224 / 256 if img_size <= 224 else 1.0
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


class LabelledSamples(Dataset):
    """Decode + transform one (epoch, file index) key; unreadable files come back as errors."""

    def __init__(self, images: ImageList, transform: Transform, seed: int, strict: bool) -> None:
        self.paths, self.transform, self.seed, self.strict = images.paths, transform, seed, strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[Optional[torch.Tensor], int, Optional[str]]:
        epoch, idx = key
        img, reason = load_rgb_or_reason(self.paths[idx], self.strict)
        if img is None:
            return None, idx, reason
        with seeded_rngs(sample_seed(self.seed, epoch, idx)):
            return self.transform(img), idx, None


def collate_labelled(items: list) -> Tuple[Optional[torch.Tensor], torch.Tensor, list]:
    """(stacked images or None, their file indices, "path: why" of the files that failed)."""
    good = [(t, i) for t, i, err in items if err is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), [e for _, _, e in items if e]


class LabelledLoader(Loader):
    """(images, labels) batches through a torch DataLoader, with the position logic of the
    pretraining loaders (``set_epoch``, ``state_dict``/``load_state_dict``, rank striding)."""

    kind = "labelled"

    def __init__(self, images: ImageList, transform: Transform, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 strict: bool = False, num_workers: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        super().__init__(batch_size, seed, rank, world_size, drop_last, True, len(images), device)
        self.images, self.shuffle = images, shuffle
        self.skipped = list(images.skipped)
        self._labels = torch.tensor(images.labels, dtype=torch.long)
        self._sampler = EpochBatches()
        workers = max(0, int(num_workers))
        # own generator: creating the iterator must not draw from the global torch RNG (exact resume)
        self._dl = DataLoader(
            LabelledSamples(images, transform, seed, strict), batch_sampler=self._sampler,
            num_workers=workers, collate_fn=collate_labelled, pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init if workers else None, persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if workers else None)

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._sampler.epoch = epoch
        order = epoch_order(self.num_files, self.seed, epoch, self.rank, self.world_size, self.shuffle)
        self._sampler.batches = list(self._batch_ranges(order, start))
        for images, idx, errors in self._dl:
            self._report_unreadable(errors)
            if images is None:
                continue
            yield (images.to(self.device, non_blocking=True),
                   self._labels[idx].to(self.device, non_blocking=True))


def build_labelled_loader(images: ImageList, transform: Transform, batch_size: int, *, seed: int = 0,
                          rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                          strict: bool = False, num_workers: int = 8, training: bool = True
                          ) -> LabelledLoader:
    """Training (shuffled, full batches) or evaluation (file order, every file once) loader."""
    if isinstance(images, ShardSet):
        from .shard_loaders import build_labelled_shard_loader

        return build_labelled_shard_loader(images, transform, batch_size, seed=seed, rank=rank,  # type: ignore[return-value]
                                           world_size=world_size, device=device, strict=strict,
                                           num_workers=num_workers, training=training)
    return LabelledLoader(images, transform, batch_size, seed=seed, rank=rank, world_size=world_size,
                          device=device, strict=strict, num_workers=num_workers, shuffle=training,
                          drop_last=training)


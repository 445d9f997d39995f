"""Frozen-encoder features of labelled images, shared by the feature probe (``mae-linprobe --method
logistic``) and the k-NN monitor of ``mae-pretrain``.

Each process embeds its share of the files (rank r: files r, r + W, ...), in file order, without
autograd and with the model in eval mode; the features are then gathered so that every process holds
all of them in file order: the same numbers as one process (up to float rounding of batched matmuls).
Nothing is drawn from the global RNGs (a view's augmentation is seeded by (seed, view, file index)),
so running this inside a training run leaves its trajectory untouched.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from mae_fast.device import DistInfo, autocast_for

from ..data.labelled import LabelledSamples, Transform, collate_labelled
from ..data.loader_base import EpochDataLoader
from ..data.sources import ImageList

log = logging.getLogger("mae_fast.data")

Encoder = Callable[[torch.Tensor], torch.Tensor]
POOLS = ("cls", "avg")


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, 1 + L, D) encoder tokens -> (N, D): the cls token, or the mean of the patch tokens."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def mae_encoder(model: nn.Module, pool: str) -> Encoder:
    """Features of an MAE (``MaskedAutoencoderViT``): ``forward_features`` (every patch, no masking,
    final norm) pooled as ``pool``; images cast to the model's dtype (float64 runs)."""
    dtype = next(model.parameters()).dtype
    return lambda imgs: pool_tokens(model.forward_features(imgs.to(dtype)), pool)


def classifier_encoder(model: nn.Module) -> Encoder:
    """Features of a timm VisionTransformer classifier: its pooled pre-logits (what its head sees)."""
    return lambda imgs: model.forward_head(model.forward_features(imgs), pre_logits=True)


class FeatureExtractor:
    """Embeds every image of ``images`` (seen through ``transform``) with an encoder; see the module doc."""

    def __init__(self, images: ImageList, transform: Transform, batch_size: int, info: DistInfo,
                 device: torch.device, num_workers: int = 0, seed: int = 0, strict: bool = False) -> None:
        if not isinstance(images, ImageList):
            raise ValueError(f"{getattr(images, 'root', images)!r}: feature extraction reads image files (an "
                             f"ImageFolder tree or a list file), not tar shards")
        self.images, self.batch_size, self.info, self.device = images, batch_size, info, device
        self.labels = torch.tensor(images.labels, dtype=torch.long)
        self.reported: set = set()
        self.loader = EpochDataLoader(LabelledSamples(images, transform, seed, strict), collate_labelled, seed,
                                      num_workers, pin_memory=device.type == "cuda")

    def __len__(self) -> int:
        return len(self.images)

    def batches(self) -> List[List[int]]:
        """This rank's file indices, in file order, in batches."""
        mine = list(range(self.info.rank, len(self.images), self.info.world_size))
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    @torch.no_grad()
    def __call__(self, model: nn.Module, encode: Encoder, precision: str = "fp32", view: int = 0
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (n, D) float32 on the device, their labels (n,), their file indices (n,)) of every
        image that could be read, in file order, on every process. ``view`` seeds the augmentation."""
        was_training = model.training
        model.eval()
        feats, index = [], []
        try:
            for imgs, idx, errors in self.loader.run(view, self.batches()):
                for err in errors:
                    if err not in self.reported:
                        log.warning("skipping unreadable image %s", err)
                        self.reported.add(err)
                if imgs is None:
                    continue
                with autocast_for(precision, self.device):
                    out = encode(imgs.to(self.device, non_blocking=True))
                feats.append(out.float())
                index.append(idx.to(self.device))
        finally:
            model.train(was_training)
        if not feats:
            raise ValueError(f"{self.images.root!r}: none of the images of this process could be read")
        local, local_index = torch.cat(feats), torch.cat(index)
        full, full_index = gather_in_file_order(local, local_index, self.info)
        return full, self.labels.to(self.device)[full_index], full_index

    def close(self) -> None:
        self.loader.close()


def gather_in_file_order(feats: torch.Tensor, index: torch.Tensor, info: DistInfo
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (features, file indices) on every rank, sorted by file index (all-gather, padded
    to the longest share)."""
    if not info.enabled:
        order = torch.argsort(index)
        return feats[order], index[order]
    counts = torch.tensor([feats.shape[0]], device=feats.device)
    all_counts = [torch.zeros_like(counts) for _ in range(info.world_size)]
    dist.all_gather(all_counts, counts)
    longest = int(max(c.item() for c in all_counts))
    pad = longest - feats.shape[0]
    padded = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])])
    padded_index = torch.cat([index, index.new_full((pad,), -1)])
    got = [torch.empty_like(padded) for _ in range(info.world_size)]
    got_index = [torch.empty_like(padded_index) for _ in range(info.world_size)]
    dist.all_gather(got, padded)
    dist.all_gather(got_index, padded_index)
    all_feats = torch.cat([g[:int(c.item())] for g, c in zip(got, all_counts)])
    all_index = torch.cat([g[:int(c.item())] for g, c in zip(got_index, all_counts)])
    order = torch.argsort(all_index)
    return all_feats[order], all_index[order]

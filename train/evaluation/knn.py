"""Weighted k-NN classification of frozen features (as DINO: cosine similarity of L2-normalized
features, the k nearest training images vote with weight exp(similarity / temperature)), and the
online k-NN monitor of ``mae-pretrain --knn-data DIR``.

The monitor embeds DIR/train and DIR/val with the current encoder (``forward_features``: every patch,
no masking) every ``--knn-every`` epochs and at the end, and logs k-NN top-1/top-5 (top-5 only above
5 classes) to ``eval.csv``, TensorBoard and the summary. It draws nothing from the global RNGs (and puts
every RNG state back anyway), touches no training data order and no weights, so a run with it trains
exactly as one without.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae_fast.device import DistInfo

from ..engine.steps import StepPlan
from ..run_state import rng_state, set_rng_state
from .features import POOLS, FeatureExtractor, mae_encoder

log = logging.getLogger("mae_fast.train")


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """(Q, num_classes) class scores of each query: the sum of exp(cos / temperature) over its k nearest
    training features (cosine similarity), by their label."""
    train = F.normalize(train_feats.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    k = min(k, train.shape[0])
    chunk = max(1, 2**26 // max(1, train.shape[0]))  # similarity blocks of at most 64M entries
    scores = torch.zeros(query.shape[0], num_classes, device=query.device)
    for start in range(0, query.shape[0], chunk):
        sim, idx = (query[start:start + chunk] @ train.T).topk(k, dim=1)
        scores[start:start + chunk].scatter_add_(1, train_labels[idx], (sim / temperature).exp())
    return scores


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07
                 ) -> Dict[str, float]:
    """Weighted k-NN top-1 / top-5 (%) of the validation features (no top-5 with 5 classes or fewer)."""
    from .classifier import topk_hits, without_trivial_top5

    scores = knn_scores(train_feats, train_labels, val_feats, num_classes, k, temperature)
    hits1, hits5 = topk_hits(scores, val_labels)
    n = max(1, val_labels.shape[0])
    return without_trivial_top5({"knn_acc1": 100.0 * hits1.item() / n, "knn_acc5": 100.0 * hits5.item() / n},
                                num_classes)


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Every RNG state (torch CPU and CUDA, numpy, python) as it was before the block."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """An FSDP2 root's own parameters gathered for a call outside ``forward`` (blocks gather theirs)."""
    if hasattr(model, "unshard") and hasattr(model, "reshard"):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


class KnnMonitor:
    """k-NN accuracy of a pretraining encoder on an ImageFolder tree with train/ and val/ (see the module doc).

    ``maybe_run(model, step, plan, runlog, final)`` after each optimizer step: runs when an
    epoch that is a multiple of ``every`` has just ended, or at the last step (``final``); returns the
    metrics it logged, or None when it did not run. Every process calls it (each embeds its share).
    """

    def __init__(self, data: str, img_size: int, info: DistInfo, device: torch.device, *, every: int = 1,
                 k: int = 20, temperature: float = 0.07, pool: str = "cls", batch_size: int = 256,
                 num_workers: int = 0, precision: str = "fp32", strict: bool = False) -> None:
        from ..data.labelled import check_classes, eval_transform, num_classes_of, scan_labelled

        root = Path(data).expanduser()
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise FileNotFoundError(f"--knn-data {data}: expected an ImageFolder tree with train/ and val/ "
                                    f"sub-folders (one folder of images per class in each)")
        if pool not in POOLS:
            raise ValueError(f"--knn-pool must be one of {POOLS}, got {pool!r}")
        train = scan_labelled(str(root / "train"), strict, info.rank, info.world_size)
        val = scan_labelled(str(root / "val"), strict, info.rank, info.world_size)
        self.num_classes = max(num_classes_of(train), num_classes_of(val))
        check_classes(train, val, self.num_classes)
        transform = eval_transform(img_size)
        self.splits = {name: FeatureExtractor(images, transform, batch_size, info, device, num_workers,
                                              strict=strict) for name, images in (("train", train), ("val", val))}
        self.info, self.every, self.k, self.temperature, self.pool = info, every, k, temperature, pool
        self.precision = precision
        self.last: Optional[Dict[str, Any]] = None
        self._last_step = -1

    @classmethod
    def from_config(cls, cfg: Any, info: DistInfo, device: torch.device) -> Optional["KnnMonitor"]:
        """The monitor ``mae-pretrain``'s options ask for (``--knn-data``), or None."""
        if not cfg.knn_data:
            return None
        return cls(cfg.knn_data, cfg.img_size, info, device, every=cfg.knn_every, k=cfg.knn_k,
                   temperature=cfg.knn_temperature, pool=cfg.knn_pool, batch_size=cfg.batch_size,
                   num_workers=cfg.num_workers, precision=cfg.precision, strict=cfg.strict_data)

    def due(self, step: int, plan: StepPlan, final: bool = False) -> bool:
        if step == self._last_step:
            return False
        return final or (plan.ends_epoch(step) and plan.epochs_done(step) % self.every == 0)

    def run(self, model: nn.Module) -> Dict[str, float]:
        """k-NN top-1/top-5 of ``model``'s encoder now (no RNG drawn or changed, weights untouched)."""
        encode = mae_encoder(model, self.pool)
        with rng_preserved(), unsharded(model):
            train_f, train_y, _ = self.splits["train"](model, encode, self.precision)
            val_f, val_y, _ = self.splits["val"](model, encode, self.precision)
        return knn_accuracy(train_f, train_y, val_f, val_y, self.num_classes, self.k, self.temperature)

    def maybe_run(self, model: nn.Module, step: int, plan: StepPlan, runlog: Any = None,
                  final: bool = False) -> Optional[Dict[str, Any]]:
        """Run if due (see the class doc); log to ``runlog`` (eval.csv, TensorBoard) and the console."""
        from .classifier import accuracy_text

        if not self.due(step, plan, final):
            return None
        t0 = time.perf_counter()
        metrics = self.run(model)
        self._last_step = step
        epoch = plan.progress(step)
        if runlog is not None:
            runlog.write_eval(step, epoch, metrics)
        if self.info.is_main:
            log.info("k-NN (k=%d, T=%g, %s pooling) at step %d (epoch %.2f): %s (%d train / %d val images, %.1f s)",
                     self.k, self.temperature, self.pool, step, epoch, accuracy_text(metrics, "knn_"),
                     len(self.splits["train"]), len(self.splits["val"]), time.perf_counter() - t0)
        self.last = {**metrics, "step": step, "epoch": epoch}
        return self.last

    def close(self) -> None:
        for split in self.splits.values():
            split.close()

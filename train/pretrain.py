"""``mae-pretrain``: MAE pretraining, single process or under torchrun (DDP or FSDP2).

    mae-pretrain --demo                                         # tiny model, bundled images, CPU
    mae-pretrain --model mae_vit_large_patch16 --data /imagenet/train --output-dir runs/l
    torchrun --nproc_per_node 8 -m mae_fast.train.pretrain --preset vit_h14_448 --data ...

Runs are exactly resumable (``--resume auto``): checkpoints hold model (official keys), optimizer,
step, epoch, loader position, RNG states and config; masks are drawn from a per-step generator so
that the same global batch gives the same masks whatever the number of processes.

Progressive resolution (``--grow-from 224 --img-size 448``): each epoch's image side, batch and lr come from
``cfg.schedule()`` (mae_fast/resolution.py); the loader crops to it and the model takes it (``set_input_size``),
while checkpoints keep the final size's position tables.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from mae_fast.checkpoint import load_mae_checkpoint
from mae_fast.device import DistInfo, autocast_for, compute_dtype
from mae_fast.model_spec import ModelSpec
from mae_fast.model_spec import build_model as build_from_spec
from mae_fast.models_mae import MaskedAutoencoderViT

from .engine.cli import AUTO, run_main
from .engine.config import PretrainConfig, parse_config
from .engine.loop import EpochShape, Job, adamw_step, fit, start
from .engine.optim import build_adamw
from .engine.steps import StepPlan
from .evaluation.knn import KnnMonitor
from .run_state import RunLog

log = logging.getLogger("mae_fast.train")


def mask_noise(seed: int, step: int, micro: int, global_batch: int, num_patches: int, info: DistInfo,
               device: torch.device) -> torch.Tensor:
    """Masking noise of this process's rows of the global batch, from a (seed, step, micro) generator
    on ``device`` (no host RNG or copy in the step). Rank r holds global rows r, r + W, r + 2W, ...
    (the loader strides files the same way), so any number of processes draws the same masks."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_009 + micro)
    noise = torch.rand(global_batch, num_patches, generator=g, device=device)
    return noise[info.rank::info.world_size]


def memory_tracer(cfg: PretrainConfig, device: torch.device) -> Any:
    """The memory planner's ``StepTracer`` for this run: its model spec (``auto`` batch or checkpointing left to
    each trace) and its step, fused AdamW under ``StepRunner``, on fake tensors standing in for ``device``."""
    from mae_fast.memory import StepTracer

    make_step = adamw_step(cfg.precision, cfg.blr, cfg.weight_decay, cfg.accum_iter, cfg.skip_nonfinite)
    planned = {k: v for k, v in (("batch_size", 1), ("grad_checkpointing", 0)) if getattr(cfg, k) == AUTO}
    return StepTracer(ModelSpec.from_options(cfg, **planned), make_step, device.type)


def plan_memory(cfg: PretrainConfig, device: torch.device) -> Optional[Any]:
    """Resolve ``--batch-size auto`` / ``--grad-checkpointing auto`` in ``cfg`` from the predicted peak
    memory of the real step (mae_fast.memory.plan_batch), at every size of a resolution schedule (see
    :func:`plan_schedule_sizes`); returns the final size's plan, or None when nothing was auto."""
    if AUTO not in (cfg.batch_size, cfg.grad_checkpointing):
        return None
    from mae_fast.memory import plan_batch

    budget = int(cfg.memory_budget * 2**30) if cfg.memory_budget else None
    auto_batch = cfg.batch_size == AUTO
    plan = plan_batch(memory_tracer(cfg, device), budget_bytes=budget,
                      batch=None if auto_batch else cfg.batch_size,
                      grad_checkpointing=None if cfg.grad_checkpointing == AUTO else cfg.grad_checkpointing)
    cfg.batch_size, cfg.grad_checkpointing = plan.batch_size, plan.grad_checkpointing
    log.info("memory %s", plan.describe())
    plan_schedule_sizes(cfg, device, budget, auto_batch)
    return plan


def plan_schedule_sizes(cfg: PretrainConfig, device: torch.device, budget: Optional[int], auto_batch: bool) -> None:
    """The planned step at every other size of the resolution schedule, at its batch (a multiple of the final
    one with ``--grow-batch tokens``), each logged. One that would not fit lowers an ``auto`` batch to what fits
    there; a batch the user gave raises MemoryPlanError naming the size and batch."""
    from mae_fast.errors import MemoryPlanError
    from mae_fast.memory import plan_batch

    schedule = cfg.schedule()
    for first, _, size in schedule.phases():
        if size == cfg.img_size:
            continue
        multiple = schedule.batch_at(first, 1)
        tracer = memory_tracer(dataclasses.replace(cfg, img_size=size), device)
        plan = plan_batch(tracer, budget_bytes=budget, batch=cfg.batch_size * multiple,
                          grad_checkpointing=cfg.grad_checkpointing)
        if not plan.fits and auto_batch:
            largest = plan_batch(tracer, budget_bytes=budget, grad_checkpointing=cfg.grad_checkpointing).batch_size
            cfg.batch_size = max(1, largest // multiple)
            plan = plan_batch(tracer, budget_bytes=budget, batch=cfg.batch_size * multiple,
                              grad_checkpointing=cfg.grad_checkpointing)
            log.info("memory at %d px: the batch is lowered to %d (x%d here) to fit", size, cfg.batch_size, multiple)
        log.info("memory at %d px: %s", size, plan.describe())
        if not plan.fits:
            raise MemoryPlanError(f"at {size} px the batch {cfg.batch_size * multiple} does not fit: "
                                  f"{plan.describe()}; use a smaller --batch-size or --grow-batch fixed")


def out_of_memory_message(cfg: PretrainConfig, device: torch.device) -> str:
    """One line for a device out-of-memory: the predicted peak of this step, against what, and what to try."""
    from mae_fast.memory import oom_message

    try:
        pred = memory_tracer(cfg, device).predict(cfg.batch_size, cfg.grad_checkpointing)
    except Exception as e:  # the prediction is a help, never a second failure
        return (f"out of memory on {device} at batch {cfg.batch_size} (no prediction: {type(e).__name__}); try "
                f"--batch-size auto, --grad-checkpointing 1 or --accum-iter")
    return oom_message(pred)


def build_model(cfg: PretrainConfig, device: torch.device) -> MaskedAutoencoderViT:
    """The model as configured (``mae_fast.model_spec.build_model`` of its spec), on ``device``: kernels
    self-tested, attention chosen, checkpointing set, initial weights loaded (``--init-from``)."""
    model = build_from_spec(ModelSpec.from_options(cfg), device)
    if cfg.init_from:
        report = load_mae_checkpoint(model, cfg.init_from)
        log.info(report.summary())
    return model


class PretrainJob(Job):
    """MAE pretraining as a :class:`Job`: the masked-reconstruction loss of each batch (masks from a
    (seed, step, micro) generator), the k-NN monitor, the loss curve and reconstruction figure."""

    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, model: MaskedAutoencoderViT, loader: Any, info: DistInfo,
                 device: torch.device):
        base_lr = cfg.lr if cfg.lr is not None else cfg.blr * cfg.effective_batch * info.world_size / 256
        super().__init__(cfg, model, loader, base_lr, info, device)
        self.max_skips, self.distributed = cfg.skip_nonfinite, cfg.distributed
        self.schedule = cfg.schedule()
        self.shape = EpochShape(cfg.img_size, cfg.batch_size)  # the current epoch's (enter_epoch)
        self.knn = KnnMonitor.from_config(cfg, info, device)  # --knn-data: checked and scanned before training
        if self.schedule.grows and info.is_main:
            log.info("resolution schedule: %s; below %d px, %s position tables", self.schedule.describe(), cfg.img_size,
                     cfg.grow_positions)
            for first, end, size in self.schedule.phases():
                shape = self.epoch_shape(first)
                log.info("  epochs %d-%d: %d px, batch %d per process (%d in all), base lr %.3g", first, end - 1,
                         size, shape.batch_size, shape.batch_size * cfg.accum_iter * info.world_size,
                         base_lr * shape.lr_scale)

    def epoch_shape(self, epoch: int) -> Optional[EpochShape]:
        if not self.schedule.grows:
            return None
        multiple = self.schedule.batch_at(epoch, 1)
        return EpochShape(self.schedule.size_at(epoch), self.cfg.batch_size * multiple, float(multiple))

    def enter_epoch(self, epoch: int) -> bool:
        shape = self.epoch_shape(epoch)
        if shape is None or shape == self.shape:
            return False
        self.shape = shape
        self.model.set_input_size(shape.img_size, self.cfg.grow_positions)
        if self.cfg.attn_backend == "auto":  # timed again at this size's shapes (on CUDA)
            self.model.set_attn_backend("auto", dtype=compute_dtype(self.cfg.precision), batch=shape.batch_size,
                                        mask_ratio=self.cfg.mask_ratio)
        if self.info.is_main:
            log.info("epoch %d: %d px, batch %d per process, lr x%g", epoch, shape.img_size, shape.batch_size,
                     shape.lr_scale)
        return True

    def optimizer_for(self, wrapped: torch.nn.Module) -> torch.optim.Optimizer:
        return build_adamw(wrapped, self.base_lr, self.cfg.weight_decay)

    def loss(self, imgs: torch.Tensor, step: int, micro: int) -> Tuple[torch.Tensor, int]:
        cfg, info, device = self.cfg, self.info, self.device
        imgs = imgs.to(device, torch.float64 if cfg.precision == "fp64" else None, non_blocking=True)
        noise = mask_noise(cfg.seed, step, micro, self.shape.batch_size * info.world_size, self.model.input_patches,
                           info, device)
        with autocast_for(cfg.precision, device):
            loss, _, _ = self.wrapped(imgs, mask_ratio=cfg.mask_ratio, noise=noise)
        return loss, imgs.shape[0]

    def check_resumable(self, state: Dict[str, Any], source: str) -> None:
        check_resumable(self.model, state, source)

    def evaluate(self, step: int, plan: StepPlan, runlog: RunLog) -> None:
        if self.knn is not None:
            with self.model.input_size_as(self.cfg.img_size):  # its images are of the final size
                self.knn.maybe_run(self.model, step, plan, runlog, final=step == plan.total_steps)

    def summary(self) -> Dict[str, Any]:
        grown = {"resolution": self.schedule.describe()} if self.schedule.grows else {}
        return {**grown, "skipped_images": [p for p, _ in self.loader.skipped],
                "knn": self.knn.last if self.knn is not None else None}

    def figures(self, out: Path) -> Dict[str, Any]:
        with self.model.input_size_as(self.cfg.img_size):
            return write_figures(self.cfg, self.model, out)

    def close(self) -> None:
        if self.knn is not None:
            self.knn.close()


def train(cfg: PretrainConfig) -> Dict[str, Any]:
    """Run pretraining as configured; returns the summary also written to ``summary.json``."""
    from .data.loaders import build_loader

    info, device, out = start(cfg, f"runs/{cfg.preset or 'mae'}")
    np.random.seed(cfg.seed + info.rank)  # seeded (as the official code) so that checkpoints hold
    random.seed(cfg.seed + info.rank)  # the same RNG states in a resumed run as in an uninterrupted one
    plan_memory(cfg, device)
    model = build_model(cfg, device)
    loader = build_loader(cfg.data, kind=cfg.loader, batch_size=cfg.batch_size, img_size=cfg.img_size,
                          seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=device,
                          strict=cfg.strict_data, num_workers=cfg.num_workers, drop_last=True,
                          scale=(cfg.min_crop_scale, 1.0), shard_streams=cfg.data_streams,
                          shard_block=cfg.shuffle_block)
    try:
        return fit(cfg, PretrainJob(cfg, model, loader, info, device), out)
    except torch.OutOfMemoryError as e:
        raise MemoryError(out_of_memory_message(cfg, device)) from e


def check_resumable(model: MaskedAutoencoderViT, state: Dict[str, Any], source: str) -> None:
    """Refuse, in one line naming the file, the key and both shapes, a checkpoint of another model or size."""
    from mae_fast.checkpoint import check_compatible

    missing = check_compatible(model.state_dict(), state["model"], source)
    if missing:
        raise ValueError(f"{source}: key '{missing[0]}' is missing ({len(missing)} keys missing); the checkpoint "
                         f"is of another model")


def write_figures(cfg: PretrainConfig, model: MaskedAutoencoderViT, out: Path) -> Dict[str, str]:
    """Loss curve (always) and reconstruction (``--visualize``, demo data) beside the logs; their paths."""
    from .data.sources import demo_dir
    from .engine.plots import plot_run

    figures = {"loss_figure": str(p) for p in plot_run(out)[:1]}
    if cfg.visualize and cfg.data == "demo":
        from .visualize import reconstruction_figure

        first = sorted(Path(demo_dir()).glob("*.jpg"))[0]
        with autocast_for(cfg.precision, next(model.parameters()).device):  # as trained: a bf16 residual needs it
            fig = reconstruction_figure(model, str(first), out / "reconstruction.png", mask_ratio=cfg.mask_ratio,
                                        seed=cfg.seed)
        figures["figure"] = str(fig)
        log.info("reconstruction figure: %s", fig)
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    return run_main("mae-pretrain", lambda: parse_config(argv), train)


if __name__ == "__main__":
    sys.exit(main())

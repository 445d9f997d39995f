"""``mae-pretrain``: MAE pretraining, single process or under torchrun (DDP or FSDP2).

    mae-pretrain --demo                                         # tiny model, bundled images, CPU
    mae-pretrain --model mae_vit_large_patch16 --data /imagenet/train --output-dir runs/l
    torchrun --nproc_per_node 8 -m mae_fast.train.pretrain --preset vit_h14_448 --data ...

Runs are exactly resumable (``--resume auto``): checkpoints hold model (official keys), optimizer,
step, epoch, loader position, RNG states and config; masks are drawn from a per-step generator so
that the same global batch gives the same masks whatever the number of processes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from mae_fast.checkpoint import load_mae_checkpoint
from mae_fast.compile import apply_compile
from mae_fast.device import autocast_for, compute_dtype, requested_device_type, resolve_device
from mae_fast.models_mae import MaskedAutoencoderViT, create_model

from mae_fast.train.engine.cli import AUTO, run_main
from mae_fast.train.engine.config import PretrainConfig, parse_config
from mae_fast.train.engine.distributed import DistInfo, ddp_wrap, init_distributed, unwrap
from mae_fast.train.evaluation.knn import KnnMonitor
from mae_fast.train.engine.loop import StepRunner, plan_steps, run_steps
from mae_fast.train.run_state import open_run_checkpoints
from mae_fast.train.engine.optim import build_adamw, lr_at, set_lr
from mae_fast.train.run_state import RunLog, choose_run_dir, use_progress_bar, write_json

log = logging.getLogger("mae_fast.train")

# fault injection for the tests (kill / NaN at a given optimizer step)
FAULT_KILL_AT_STEP = "MAE_FAST_FAULT_KILL_AT_STEP"
FAULT_NAN_AT_STEP = "MAE_FAST_FAULT_NAN_AT_STEP"


def mask_noise(seed: int, step: int, micro: int, global_batch: int, num_patches: int, info: DistInfo,
               device: torch.device) -> torch.Tensor:
    """Masking noise of this process's rows of the global batch, from a (seed, step, micro) generator
    on ``device`` (no host RNG or copy in the step). Rank r holds global rows r, r + W, r + 2W, ...
    (the loader strides files the same way), so any number of processes draws the same masks."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_009 + micro)
    noise = torch.rand(global_batch, num_patches, generator=g, device=device)
    return noise[info.rank::info.world_size]


def wrap_model(model: MaskedAutoencoderViT, cfg: PretrainConfig, info: DistInfo, device: torch.device):
    """DDP (no find_unused_parameters) or FSDP2 ``fully_shard`` per block then the root."""
    if not info.enabled:
        return model
    if cfg.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for blk in [*model.blocks, *model.decoder_blocks]:
            fully_shard(blk)
        return fully_shard(model)
    return ddp_wrap(model, device)


def run_dir_for(cfg: PretrainConfig) -> Path:
    """The folder this run writes to (see :func:`run_folder.choose_run_dir`); refuses one holding a run."""
    return choose_run_dir(cfg.output_dir, f"runs/{cfg.preset or 'mae'}", cfg.resume, cfg.overwrite)


def plan_memory(cfg: PretrainConfig, device: torch.device) -> Optional[Any]:
    """Resolve ``--batch-size auto`` / ``--grad-checkpointing auto`` in ``cfg`` from the predicted peak
    memory of the real step (mae_fast.memory.plan_batch); returns the plan, or None when nothing was auto."""
    if AUTO not in (cfg.batch_size, cfg.grad_checkpointing):
        return None
    from mae_fast.memory import plan_batch

    budget = int(cfg.memory_budget * 2**30) if cfg.memory_budget else None
    plan = plan_batch(cfg.model, cfg.img_size, cfg.precision, budget_bytes=budget,
                      batch=None if cfg.batch_size == AUTO else cfg.batch_size,
                      grad_checkpointing=None if cfg.grad_checkpointing == AUTO else cfg.grad_checkpointing,
                      device_type=device.type, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)
    cfg.batch_size, cfg.grad_checkpointing = plan.batch_size, plan.grad_checkpointing
    log.info("memory %s", plan.describe())
    return plan


def out_of_memory_message(cfg: PretrainConfig, device: torch.device) -> str:
    """One line for a device out-of-memory: the predicted peak of this step, against what, and what to try."""
    from mae_fast.memory import oom_message, predict_memory

    try:
        pred = predict_memory(cfg.model, cfg.img_size, cfg.batch_size, cfg.precision, cfg.grad_checkpointing,
                              device_type=device.type, mask_ratio=cfg.mask_ratio, norm_pix_loss=cfg.norm_pix_loss)
    except Exception as e:  # the prediction is a help, never a second failure
        return (f"out of memory on {device} at batch {cfg.batch_size} (no prediction: {type(e).__name__}); try "
                f"--batch-size auto, --grad-checkpointing 1 or --accum-iter")
    return oom_message(pred)


def build_model(cfg: PretrainConfig, device: torch.device) -> MaskedAutoencoderViT:
    """The model as configured, on ``device``: kernels self-tested, attention chosen, checkpointing set,
    initial weights loaded (``--init-from``)."""
    model = create_model(cfg.model, img_size=cfg.img_size, norm_pix_loss=cfg.norm_pix_loss)
    model = model.to(device, torch.float64 if cfg.precision == "fp64" else None)
    model.set_kernel_backend(cfg.kernel_backend)
    model.check_kernels(dtype=compute_dtype(cfg.precision))
    model.set_attn_backend(cfg.attn_backend, dtype=compute_dtype(cfg.precision), batch=cfg.batch_size,
                           mask_ratio=cfg.mask_ratio)
    model.set_activation_dtype(cfg.activation_dtype)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.init_from:
        report = load_mae_checkpoint(model, cfg.init_from)
        log.info(report.summary())
    return model


def train(cfg: PretrainConfig) -> Dict[str, Any]:
    """Run pretraining as configured; returns the summary also written to ``summary.json``."""
    from mae_fast.train.data.loaders import build_loader

    info = init_distributed(requested_device_type(cfg.device))
    device = resolve_device(cfg.device, info.local_rank)
    out = run_dir_for(cfg)
    if info.is_main:
        log.info("run folder: %s", out)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    np.random.seed(cfg.seed + info.rank)  # seeded (as the official code) so that checkpoints hold
    random.seed(cfg.seed + info.rank)  # the same RNG states in a resumed run as in an uninterrupted one
    plan_memory(cfg, device)

    model = build_model(cfg, device)
    num_patches = model.config.num_patches
    loader = build_loader(cfg.data, kind=cfg.loader, batch_size=cfg.batch_size, img_size=cfg.img_size,
                          seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=device,
                          strict=cfg.strict_data, num_workers=cfg.num_workers, drop_last=True,
                          scale=(cfg.min_crop_scale, 1.0), shard_streams=cfg.data_streams,
                          shard_block=cfg.shuffle_block)
    steps_per_epoch, total_steps = plan_steps(cfg, len(loader))
    knn = KnnMonitor.from_config(cfg, info, device)  # --knn-data: checked and scanned before training
    compiled = apply_compile(model, cfg.compile, device)
    wrapped = wrap_model(model, cfg, info, device)
    eff_batch = cfg.effective_batch * info.world_size
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    optimizer = build_adamw(wrapped, base_lr, cfg.weight_decay)
    runner = StepRunner(wrapped, optimizer, cfg.precision, device, info, cfg.accum_iter, cfg.skip_nonfinite)
    ckpts = open_run_checkpoints(cfg, out, wrapped, optimizer, runner, loader, info)
    state = ckpts.resume(cfg.resume, check=lambda st, source: check_resumable(model, st, source))
    step = int(state["step"]) if state else 0
    if step >= total_steps:
        log.info("already complete: step %d of %d (%s); nothing to do", step, total_steps, ckpts.last)
        return {"steps": step, "steps_this_run": 0, "already_complete": True,
                "last_checkpoint": str(ckpts.last) if ckpts.last else None}

    runlog = RunLog(out, info.is_main, cfg.tensorboard)
    if info.is_main:
        write_json(out / "config.json", dataclasses.asdict(cfg))
        log.info("model %s, %d processes, effective batch %d, lr %.3g, %d steps/epoch, %d steps, device %s, "
                 "compile %s", cfg.model, info.world_size, eff_batch, base_lr, steps_per_epoch, total_steps, device,
                 compiled)

    kill_at = int(os.environ.get(FAULT_KILL_AT_STEP, "-1"))
    nan_at = int(os.environ.get(FAULT_NAN_AT_STEP, "-1"))
    start_step = step
    t_start = time.perf_counter()

    def set_lr_for(step: int) -> float:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        lr = lr_at(step / steps_per_epoch, base_lr, cfg.warmup_epochs, cfg.epochs, cfg.min_lr)
        set_lr(optimizer, lr)
        return lr

    def compute_loss(imgs: torch.Tensor, step: int, micro: int):
        imgs = imgs.to(device, torch.float64 if cfg.precision == "fp64" else None, non_blocking=True)
        noise = mask_noise(cfg.seed, step, micro, cfg.batch_size * info.world_size, num_patches, info, device)
        with autocast_for(cfg.precision, device):
            loss, _, _ = wrapped(imgs, mask_ratio=cfg.mask_ratio, noise=noise)
        if step == nan_at:
            loss = loss * float("nan")
        return loss, imgs.shape[0]

    def after_step(step: int) -> None:
        if step == start_step + 1 and info.is_main and compiled != "off":
            log.info("first step took %.1f s (includes torch.compile %s)", time.perf_counter() - t_start, compiled)
        if knn is not None:
            knn.maybe_run(unwrap(wrapped), step, steps_per_epoch, runlog, final=step == total_steps)
        if step % cfg.save_every == 0 or step == total_steps:
            ckpts.save(step)

    wrapped.train()
    try:
        step, last_loss = run_steps(loader, runner, ckpts, step=step, total_steps=total_steps,
                                    steps_per_epoch=steps_per_epoch, accum_iter=cfg.accum_iter, log_every=cfg.log_every,
                                    set_lr_for=set_lr_for, compute_loss=compute_loss, after_step=after_step,
                                    runlog=runlog, progress="pretrain" if use_progress_bar(cfg.progress) else None)
    except torch.OutOfMemoryError as e:
        raise MemoryError(out_of_memory_message(cfg, device)) from e
    runlog.close()
    if knn is not None:
        knn.close()
    summary = {"run_dir": str(out), "steps": step, "steps_this_run": step - start_step, "final_loss": last_loss,
               "skipped_nonfinite": runner.check(ckpts.last), "last_checkpoint": str(ckpts.last) if ckpts.last else None,
               "world_size": info.world_size, "effective_batch": eff_batch, "lr": base_lr, "compile": compiled,
               "skipped_images": [p for p, _ in loader.skipped], "knn": knn.last if knn is not None else None}
    if info.is_main:
        summary.update(write_figures(cfg, unwrap(wrapped), out))
        write_json(out / "summary.json", summary)
    return summary


def check_resumable(model: MaskedAutoencoderViT, state: Dict[str, Any], source: str) -> None:
    """Refuse, in one line naming the file, the key and both shapes, a checkpoint of another model or size."""
    from mae_fast.checkpoint import check_compatible

    missing = check_compatible(model.state_dict(), state["model"], source)
    if missing:
        raise ValueError(f"{source}: key '{missing[0]}' is missing ({len(missing)} keys missing); the checkpoint "
                         f"is of another model")


def write_figures(cfg: PretrainConfig, model: MaskedAutoencoderViT, out: Path) -> Dict[str, str]:
    """Loss curve (always) and reconstruction (``--visualize``, demo data) beside the logs; their paths."""
    from mae_fast.train.engine.plots import plot_run
    from mae_fast.train.data.sources import demo_dir

    figures = {"loss_figure": str(p) for p in plot_run(out)[:1]}
    if cfg.visualize and cfg.data == "demo":
        from mae_fast.train.visualize import reconstruction_figure

        first = sorted(Path(demo_dir()).glob("*.jpg"))[0]
        fig = reconstruction_figure(model, str(first), out / "reconstruction.png", mask_ratio=cfg.mask_ratio,
                                    seed=cfg.seed)
        figures["figure"] = str(fig)
        log.info("reconstruction figure: %s", fig)
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    return run_main("mae-pretrain", lambda: parse_config(argv), train)


if __name__ == "__main__":
    sys.exit(main())

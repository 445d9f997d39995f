"""The one training loop of mae-pretrain, mae-finetune and mae-linprobe (:func:`fit`), its step read top to
bottom as the official ``train_one_epoch``: per-iteration lr, micro-steps with gradient accumulation, loss
scaling and non-finite handling (:class:`StepRunner`, no host synchronization per step), logging, evaluation
and checkpoints. What differs between the commands is a :class:`Job`: how a batch becomes a loss, what is
evaluated, what the summary holds, and (pretraining's resolution schedule) the image size, batch and lr of each epoch.

    mae-pretrain main -> run_main -> pretrain.train -> fit -> StepRunner.optimizer_step (scaler.step(optimizer))
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from mae_fast.compile import apply_compile
from mae_fast.device import DistInfo, requested_device_type, resolve_device
from mae_fast.errors import NonFiniteLossError

from ..run_state import (RunLog, agree_kernel_choices, choose_shared_run_dir, open_run_checkpoints, use_progress_bar,
                         write_json)
from .distributed import init_distributed, wrap_model
from .optim import build_adamw, lr_at, set_lr
from .steps import StepPlan, plan_steps

log = logging.getLogger("mae_fast.train")

# fault injection for the tests: the process kills itself at the start of this optimizer step / that step's
# loss is made NaN (read once per run by :func:`fit`; every command honours them)
FAULT_KILL_AT_STEP = "MAE_FAST_FAULT_KILL_AT_STEP"
FAULT_NAN_AT_STEP = "MAE_FAST_FAULT_NAN_AT_STEP"


class StepRunner:
    """Micro-steps (forward under ``sync_context``, then ``backward``) and one ``optimizer_step``.

    A GradScaler is always used: dynamic for fp16; for bf16/fp32/fp64 its scale starts at 1 and never
    grows, so it only skips, on the device, an update whose gradients are not finite (fused
    optimizers take the skip decision without a sync). A non-finite loss is made NaN on every rank so
    that every rank skips the same step. Such steps are counted on the device; ``check`` (called
    at log and save points) raises NonFiniteLossError once more than ``max_skips`` occurred.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: str, device: torch.device,
                 info: DistInfo, accum_iter: int = 1, max_skips: int = 0, clip_grad: Optional[float] = None):
        self.model, self.optimizer, self.info = model, optimizer, info
        self.accum_iter, self.max_skips, self.clip_grad = accum_iter, max_skips, clip_grad
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)
        else:
            self.scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.last_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.reported = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=device)
        self.images = 0
        self.t_log = time.perf_counter()
        self._step_ok: Optional[torch.Tensor] = None

    def sync_context(self, last_micro: bool):
        """Gradient all-reduce only on the micro-step that ends an accumulation (DDP no_sync, FSDP2)."""
        if not self.info.enabled:
            return contextlib.nullcontext()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last_micro else self.model.no_sync()

    def backward(self, loss: torch.Tensor, micro: int, images: int) -> None:
        """Backward of ``loss / accum_iter`` (scaled); remembers, on the device, whether it was finite."""
        finite = torch.isfinite(loss.detach())
        if self.info.enabled:
            flag = finite.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.bool()
        loss = torch.where(finite, loss, torch.full_like(loss, float("nan")))
        self._step_ok = finite if micro == 0 or self._step_ok is None else self._step_ok & finite
        self.scaler.scale(loss / self.accum_iter).backward()
        self.loss_sum += torch.where(finite, loss.detach(), torch.zeros_like(loss)).double()
        self.loss_count += finite.double()
        self.images += images * self.info.world_size

    def optimizer_step(self, step: int) -> None:
        """Clip (optional), step (skipped on the device if gradients are not finite), zero the grads."""
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        bad = ~self._step_ok
        self.bad_steps += bad.to(torch.int64)
        self.last_bad = torch.where(bad, torch.full_like(self.last_bad, step), self.last_bad)

    def check(self, last_checkpoint: Any) -> int:
        """Host sync: report newly skipped steps; raise once more than ``max_skips``. Returns the count."""
        n = int(self.bad_steps)
        if n > self.reported:
            last = int(self.last_bad)
            if n > self.max_skips:
                raise NonFiniteLossError(
                    f"loss is not finite at step {last} ({n} non-finite step(s); at most {self.max_skips} may be "
                    f"skipped); the update was not applied; last good checkpoint: {last_checkpoint or 'none'}. "
                    f"Resume from it with --resume auto and a lower lr, bf16 instead of fp16, or allow skips "
                    f"with --skip-nonfinite K")
            if self.info.is_main:
                log.warning("step %d: non-finite loss, step skipped (%d of at most %d)", last, n, self.max_skips)
            self.reported = n
        return n

    def log(self, step: int, epoch: float, lr: float, runlog: RunLog, bar=None, total_steps: int = 0) -> float:
        """Host sync: mean loss since the last call (over ranks), images/s; writes CSV/TensorBoard and the
        bar, or (no bar: output is not a terminal) one plain log line. ``epoch``: epochs done, fractional."""
        stats = torch.stack([self.loss_sum, self.loss_count])
        if self.info.enabled:
            dist.all_reduce(stats)
        total, count = stats.tolist()
        loss = total / count if count else float("nan")
        now = time.perf_counter()
        ips = self.images / max(now - self.t_log, 1e-9)
        runlog.write(step, epoch, loss, lr, ips)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        elif self.info.is_main:
            log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.3e  %.0f img/s", step, total_steps, epoch, loss, lr,
                     ips)
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.images, self.t_log = 0, now
        return loss

    def state_dict(self) -> Dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "bad_steps": int(self.bad_steps), "last_bad": int(self.last_bad)}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.bad_steps.fill_(int(state.get("bad_steps", 0)))
        self.last_bad.fill_(int(state.get("last_bad", -1)))
        self.reported = int(state.get("bad_steps", 0))


def adamw_step(precision: str, lr: float = 1.5e-4, weight_decay: float = 0.05, accum_iter: int = 1,
               max_skips: int = 0) -> Callable[[nn.Module, torch.device], StepRunner]:
    """mae-pretrain's optimizer step for a model on a device, one process: the recipe's fused AdamW under a
    :class:`StepRunner`. What the memory planner traces and the benchmarks time (the lr changes no allocation)."""
    def make_step(model: nn.Module, device: torch.device) -> StepRunner:
        return StepRunner(model, build_adamw(model, lr, weight_decay), precision, device, DistInfo(), accum_iter,
                          max_skips)
    return make_step


class EpochShape(NamedTuple):
    """The image side, batch per process and lr multiple of one epoch (a resolution schedule's)."""

    img_size: int
    batch_size: int
    lr_scale: float = 1.0


class Job(ABC):
    """What one command trains, built by the command: the model (unwrapped), its data and lr, and the parts of
    the loop that differ (the loss of a batch, evaluation, what a checkpoint and the summary add)."""

    name = "job"  # the command's task: labels the progress bar, the log and the checkpoints
    save_each_epoch = False  # also checkpoint at every epoch's end (classification evaluates there)
    clip_grad: Optional[float] = None
    max_skips = 0  # non-finite steps that may be skipped before the run stops
    distributed = "ddp"  # how the model is wrapped under torchrun: "ddp" or "fsdp" (FSDP2 per block)

    def __init__(self, cfg: Any, model: nn.Module, loader: Any, base_lr: float, info: DistInfo, device: torch.device):
        self.cfg, self.model, self.loader, self.base_lr = cfg, model, loader, base_lr
        self.info, self.device = info, device
        self.wrapped: nn.Module = model  # set by fit: the module that computes (compiled, DDP / FSDP2)

    @abstractmethod
    def optimizer_for(self, wrapped: nn.Module) -> torch.optim.Optimizer:
        """The optimizer over ``wrapped``'s parameters (built after wrapping: FSDP2 shards them)."""

    @abstractmethod
    def loss(self, batch: Any, step: int, micro: int) -> Tuple[torch.Tensor, int]:
        """(loss, images) of one micro-batch, forward under autocast through ``self.wrapped``."""

    def check_resumable(self, state: Dict[str, Any], source: str) -> None:
        """Refuse, in one line, a checkpoint of another model before anything is loaded from it."""

    def resumed(self, state: Dict[str, Any]) -> None:
        """Take the job's own fields from a resumed checkpoint (e.g. the best accuracy so far)."""

    def epoch_shape(self, epoch: int) -> Optional[EpochShape]:
        """The image side, batch and lr multiple of ``epoch``, or None: the loader's and ``base_lr`` throughout."""
        return None

    def enter_epoch(self, epoch: int) -> bool:
        """Set the model up for ``epoch`` before its first batch (e.g. the input size of its shape); whether
        that changed what the step computes (its first step then times the kernels of the new shapes)."""
        return False

    def evaluate(self, step: int, plan: StepPlan, runlog: RunLog) -> None:
        """Evaluate when due after optimizer step ``step`` (k-NN monitor, top-1 each epoch); default none."""

    def checkpoint_extra(self) -> Dict[str, Any]:
        """Fields a checkpoint holds beside the run state."""
        return {}

    def summary(self) -> Dict[str, Any]:
        """The job's fields of the run summary."""
        return {}

    def figures(self, out: Path) -> Dict[str, Any]:
        """Draw the run's figures beside its logs (main process); their paths for the summary."""
        from .plots import plot_run

        return {"figures": [str(p) for p in plot_run(out)]}

    def close(self) -> None:
        """Release what the job holds open (loaders of an evaluation)."""


def step_plan(cfg: Any, job: Job) -> StepPlan:
    """The optimizer steps of each epoch: the loader's length, or with a schedule (``job.epoch_shape``) the
    length at each epoch's batch, the loader then reading each epoch at its shape (``Loader.follow``)."""
    loader = job.loader
    if job.epoch_shape(0) is None:
        return plan_steps(cfg, [(len(loader), loader.batch_size)] * cfg.epochs)
    loader.follow(lambda epoch: tuple(job.epoch_shape(epoch)[:2]))
    shapes = [job.epoch_shape(epoch) for epoch in range(cfg.epochs)]
    return plan_steps(cfg, [(loader.batches_at(s.batch_size), s.batch_size) for s in shapes])


def start(cfg: Any, default_dir: str) -> Tuple[DistInfo, torch.device, Path]:
    """This process's place (torchrun), device and run folder (chosen on rank 0, see
    :func:`run_state.choose_run_dir`); seeds the model init identically on every rank."""
    info = init_distributed(requested_device_type(cfg.device))
    device = resolve_device(cfg.device, info.local_rank)
    out = choose_shared_run_dir(cfg.output_dir, default_dir, cfg.resume, cfg.overwrite, info)
    if info.is_main:
        log.info("run folder: %s", out)
    torch.manual_seed(cfg.seed)
    return info, device, out


def fit(cfg: Any, job: Job, out: Path) -> Dict[str, Any]:
    """Train ``job`` as configured from its newest state (``--resume``) to the last step; returns the summary
    also written to ``summary.json``."""
    info, device, loader = job.info, job.device, job.loader
    plan = step_plan(cfg, job)
    total_steps = plan.total_steps
    compiled = apply_compile(job.model, cfg.compile, device)
    model = job.wrapped = wrap_model(job.model, job.distributed, info, device)
    optimizer = job.optimizer_for(model)
    runner = StepRunner(model, optimizer, cfg.precision, device, info, cfg.accum_iter, job.max_skips, job.clip_grad)
    ckpts = open_run_checkpoints(cfg, out, model, optimizer, runner, loader, info)
    state = ckpts.resume(cfg.resume, check=job.check_resumable)
    step = int(state["step"]) if state else 0
    if step >= total_steps:
        log.info("already complete: step %d of %d (%s); nothing to do", step, total_steps, ckpts.last)
        return {"steps": step, "steps_this_run": 0, "already_complete": True,
                "last_checkpoint": str(ckpts.last) if ckpts.last else None}
    if state:
        job.resumed(state)
    runlog = RunLog(out, info.is_main, cfg.tensorboard)
    eff_batch = cfg.effective_batch * info.world_size
    if info.is_main:
        write_json(out / "config.json", dataclasses.asdict(cfg))
        log.info("%s %s in %s: %d processes, effective batch %d, lr %.3g, %s steps/epoch, %d steps, device %s, "
                 "compile %s", job.name, cfg.model, out, info.world_size, eff_batch, job.base_lr,
                 plan.epoch_steps[0] if plan.uniform else f"{min(plan.epoch_steps)}-{max(plan.epoch_steps)}",
                 total_steps, device, compiled)
    kill_at = int(os.environ.get(FAULT_KILL_AT_STEP, "-1"))
    nan_at = int(os.environ.get(FAULT_NAN_AT_STEP, "-1"))
    bar = None
    if info.is_main and use_progress_bar(cfg.progress):
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=job.name, dynamic_ncols=True)
    start_step, t_start, last_loss, lr = step, time.perf_counter(), float("nan"), 0.0
    first_step_of_shape = start_step + 1
    model.train()
    try:
        while step < total_steps:
            epoch = loader.epoch
            loader.set_epoch(epoch)
            shape = job.epoch_shape(epoch)
            base_lr = job.base_lr * (shape.lr_scale if shape else 1.0)
            if job.enter_epoch(epoch):
                first_step_of_shape = step + 1  # a new size: its kernels are timed on its first step
            for batch in loader:
                if loader.batch > plan.steps_in(epoch) * cfg.accum_iter:
                    continue  # an epoch's tail that does not fill a whole accumulation
                micro = (loader.batch - 1) % cfg.accum_iter
                if micro == 0:  # per-iteration lr: linear warmup, then half-cycle cosine
                    if step == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    lr = lr_at(plan.progress(step), base_lr, cfg.warmup_epochs, cfg.epochs, cfg.min_lr)
                    set_lr(optimizer, lr)
                last_micro = micro == cfg.accum_iter - 1
                with runner.sync_context(last_micro):  # gradients all-reduced on the last micro-step only
                    loss, images = job.loss(batch, step, micro)
                    if step == nan_at:
                        loss = loss * float("nan")
                    runner.backward(loss, micro, images)
                if not last_micro:
                    continue
                runner.optimizer_step(step)  # skipped on the device when the gradients are not finite
                step += 1
                if step == first_step_of_shape:
                    agree_kernel_choices(info)  # the first step (of a size) timed the Triton ops on each rank
                if step == start_step + 1:
                    if info.is_main and compiled != "off":
                        log.info("first step took %.1f s (includes torch.compile %s)",
                                 time.perf_counter() - t_start, compiled)
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == total_steps:
                    runner.check(ckpts.last)
                    last_loss = runner.log(step, plan.progress(step), lr, runlog, bar, total_steps)
                job.evaluate(step, plan, runlog)
                epoch_end = job.save_each_epoch and plan.ends_epoch(step)
                if step % cfg.save_every == 0 or epoch_end or step == total_steps:
                    ckpts.save(step, **job.checkpoint_extra())
                if step >= total_steps:
                    break
    finally:
        if bar is not None:
            bar.close()
    runlog.close()
    job.close()
    summary = {"run_dir": str(out), "steps": step, "steps_this_run": step - start_step, "final_loss": last_loss,
               "skipped_nonfinite": runner.check(ckpts.last),
               "last_checkpoint": str(ckpts.last) if ckpts.last else None, "world_size": info.world_size,
               "effective_batch": eff_batch, "lr": job.base_lr, "compile": compiled, **job.summary()}
    if info.is_main:
        summary.update(job.figures(out))
        write_json(out / "summary.json", summary)
    return summary

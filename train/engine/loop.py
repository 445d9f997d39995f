"""The training step shared by mae-pretrain, mae-finetune and mae-linprobe: gradient accumulation,
loss scaling, non-finite handling and loss logging, with no host synchronization per step."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


from mae_fast.errors import NonFiniteLossError
from mae_fast.train.engine.distributed import DistInfo
from mae_fast.train.run_state import RunCheckpoints, RunLog, agree_kernel_choices

log = logging.getLogger("mae_fast.train")


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

    def log(self, step: int, steps_per_epoch: int, lr: float, runlog: RunLog, bar=None,
            total_steps: int = 0) -> float:
        """Host sync: mean loss since the last call (over ranks), images/s; writes CSV/TensorBoard and the
        bar, or (no bar: output is not a terminal) one plain log line."""
        stats = torch.stack([self.loss_sum, self.loss_count])
        if self.info.enabled:
            dist.all_reduce(stats)
        total, count = stats.tolist()
        loss = total / count if count else float("nan")
        now = time.perf_counter()
        ips = self.images / max(now - self.t_log, 1e-9)
        runlog.write(step, step / steps_per_epoch, loss, lr, ips)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        elif self.info.is_main:
            log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.3e  %.0f img/s", step, total_steps,
                     step / steps_per_epoch, loss, lr, ips)
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


def plan_steps(cfg: Any, batches_per_epoch: int) -> Tuple[int, int]:
    """(optimizer steps per epoch, total steps) of a run from ``cfg`` (accum_iter, epochs, max_steps: 0 = all
    epochs); ValueError naming the data when an epoch holds fewer batches than one accumulation."""
    if batches_per_epoch < cfg.accum_iter:
        raise ValueError(f"{cfg.data}: {batches_per_epoch} batches of {cfg.batch_size} per process per epoch, "
                         f"fewer than --accum-iter {cfg.accum_iter}: use more images or a smaller batch")
    steps_per_epoch = batches_per_epoch // cfg.accum_iter
    total_steps = cfg.epochs * steps_per_epoch
    return steps_per_epoch, min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps


def run_steps(loader: Any, runner: StepRunner, ckpts: RunCheckpoints, *, step: int, total_steps: int,
              steps_per_epoch: int, accum_iter: int, log_every: int, set_lr_for: Callable[[int], float],
              compute_loss: Callable[[Any, int, int], Tuple[torch.Tensor, int]],
              after_step: Callable[[int], None], runlog: RunLog, progress: Optional[str] = None
              ) -> Tuple[int, float]:
    """The loop every trainer shares, from ``step`` to ``total_steps`` optimizer steps.

    Each optimizer step is ``accum_iter`` micro-steps: ``compute_loss(batch, step, micro)`` returns
    (loss, images) under the right gradient-sync context; an epoch's tail that does not fill an
    accumulation is skipped. ``set_lr_for(step)`` sets and returns the lr at each step's start; the
    loss is logged every ``log_every`` steps; ``after_step(step)`` evaluates / checkpoints.
    ``progress``: the label of a tqdm bar on the main process (None: no bar).
    Returns (step reached, last logged loss).
    """
    bar = None
    if progress and runner.info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=step, desc=progress, dynamic_ncols=True)
    try:
        return _run_steps(loader, runner, ckpts, step, total_steps, steps_per_epoch, accum_iter, log_every,
                          set_lr_for, compute_loss, after_step, runlog, bar)
    finally:
        if bar is not None:
            bar.close()


def _run_steps(loader, runner, ckpts, step, total_steps, steps_per_epoch, accum_iter, log_every, set_lr_for,
               compute_loss, after_step, runlog, bar) -> Tuple[int, float]:
    last_loss, lr = float("nan"), 0.0
    first_step = step
    while step < total_steps:
        loader.set_epoch(loader.epoch)
        for batch in loader:
            if loader.batch > steps_per_epoch * accum_iter:
                continue  # an epoch's tail that does not fill a whole accumulation
            micro = (loader.batch - 1) % accum_iter
            if micro == 0:
                lr = set_lr_for(step)
            last_micro = micro == accum_iter - 1
            with runner.sync_context(last_micro):
                loss, images = compute_loss(batch, step, micro)
                runner.backward(loss, micro, images)
            if not last_micro:
                continue
            runner.optimizer_step(step)
            step += 1
            if step == first_step + 1:
                agree_kernel_choices(runner.info)  # the first step timed the Triton ops on each rank
            if bar is not None:
                bar.update(1)
            if step % log_every == 0 or step == total_steps:
                runner.check(ckpts.last)
                last_loss = runner.log(step, steps_per_epoch, lr, runlog, bar, total_steps)
            after_step(step)
            if step >= total_steps:
                break
    return step, last_loss

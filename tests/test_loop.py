"""The one training loop (mae_fast.train.engine.loop.fit) on a toy job: it computes what a hand-written
loop computes (per-iteration lr, gradient accumulation, an epoch's tail skipped), resumes exactly, stops on
a non-finite loss and says when a run is already complete."""
import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn

from mae_fast.device import DistInfo
from mae_fast.errors import NonFiniteLossError
from mae_fast.train.data.loader_base import Loader
from mae_fast.train.engine.loop import FAULT_NAN_AT_STEP, Job, fit
from mae_fast.train.engine.steps import StepPlan, plan_steps
from mae_fast.train.engine.optim import lr_at

IN, OUT = 5, 3


@dataclass
class ToyConfig:
    data: str = "toy"
    model: str = "linear"
    batch_size: int = 4
    accum_iter: int = 2
    epochs: int = 3
    max_steps: int = 0
    warmup_epochs: float = 1.0
    lr: float = 0.05
    min_lr: float = 0.001
    precision: str = "fp32"
    compile: str = "off"
    output_dir: str = ""
    overwrite: bool = False
    resume: str = ""
    keep_checkpoints: int = 0
    save_every: int = 2
    log_every: int = 1
    tensorboard: bool = False
    progress: bool = False
    seed: int = 0

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_iter


class ToyLoader(Loader):
    """``num_batches`` fixed random (x, y) batches per epoch, their order drawn from (seed, epoch)."""

    kind = "toy"

    def __init__(self, num_batches: int, batch_size: int):
        super().__init__(batch_size, num_files=num_batches * batch_size, drop_last=True, with_labels=True)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(num_batches * batch_size, IN, generator=g)
        self.y = torch.randn(num_batches * batch_size, OUT, generator=g)

    def _iter_epoch(self, epoch: int, start: int):
        order = self.order(epoch)
        for idx in self._batch_ranges(order, start):
            yield self.x[idx], self.y[idx]

    def batches(self, epoch: int):
        order = self.order(epoch)
        return [(self.x[i], self.y[i]) for i in self._batch_ranges(order, 0)]


class ToyJob(Job):
    name = "toy"

    def optimizer_for(self, wrapped: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(wrapped.parameters(), lr=self.base_lr, weight_decay=0.01)

    def loss(self, batch: Any, step: int, micro: int):
        x, y = batch
        return nn.functional.mse_loss(self.wrapped(x), y), x.shape[0]

    def figures(self, out):
        return {}


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT)


def run(cfg: ToyConfig, out, num_batches: int = 5):
    job = ToyJob(cfg, toy_model(), ToyLoader(num_batches, cfg.batch_size), cfg.lr, DistInfo(), torch.device("cpu"))
    return job, fit(cfg, job, out)


def hand_written(cfg: ToyConfig, num_batches: int = 5) -> nn.Module:
    """The loop as one writes it by hand: lr per optimizer step, mean of accum_iter micro-losses, AdamW."""
    model, loader = toy_model(), ToyLoader(num_batches, cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    steps_per_epoch = num_batches // cfg.accum_iter
    step = 0
    for epoch in range(cfg.epochs):
        batches = loader.batches(epoch)[: steps_per_epoch * cfg.accum_iter]  # the tail is skipped
        for i in range(0, len(batches), cfg.accum_iter):
            for group in opt.param_groups:
                group["lr"] = lr_at(step / steps_per_epoch, cfg.lr, cfg.warmup_epochs, cfg.epochs, cfg.min_lr)
            for x, y in batches[i:i + cfg.accum_iter]:
                (nn.functional.mse_loss(model(x), y) / cfg.accum_iter).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    return model


def test_plan_steps_counts_whole_accumulations_and_names_the_data():
    cfg = ToyConfig(accum_iter=2, epochs=3)
    plan = plan_steps(cfg, [(5, 4)] * 3)
    assert (plan.epoch_steps, plan.total_steps) == ([2, 2, 2], 6)
    assert plan_steps(dataclasses.replace(cfg, max_steps=4), [(5, 4)] * 3).total_steps == 4
    with pytest.raises(ValueError, match="toy: 1 batches of 4 per process per epoch, fewer than --accum-iter 2"):
        plan_steps(cfg, [(5, 4), (1, 4), (5, 4)])


def test_step_plan_of_unequal_epochs_places_every_step():
    plan = StepPlan([4, 2, 2])  # e.g. a batch twice the final one in the first epoch
    assert plan.total_steps == 8 and not plan.uniform
    assert [plan.epoch_of(s) for s in range(8)] == [0, 0, 0, 0, 1, 1, 2, 2]
    assert [plan.progress(s) for s in (0, 2, 4, 5, 6, 8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    assert [s for s in range(9) if plan.ends_epoch(s)] == [4, 6, 8]
    assert [plan.epochs_done(s) for s in (0, 3, 4, 7, 8)] == [0, 0, 1, 2, 3]
    uniform = StepPlan.uniform_epochs(3, 4)
    assert uniform.uniform and all(uniform.progress(s) == s / 3 for s in range(13))  # as the fixed-size loop


def test_fit_computes_what_a_hand_written_loop_computes(tmp_path):
    cfg = ToyConfig(output_dir=str(tmp_path / "run"))
    job, summary = run(cfg, tmp_path / "run")
    expect = hand_written(cfg)
    assert summary["steps"] == summary["steps_this_run"] == 6 and summary["skipped_nonfinite"] == 0
    for got, want in zip(job.model.parameters(), expect.parameters()):
        assert torch.equal(got, want)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == [f"checkpoint-{s:08d}.pth" for s in (2, 4, 6)]  # every --save-every and the last
    assert len((tmp_path / "run" / "log.csv").read_text().splitlines()) == 1 + 6  # header + --log-every 1


def test_fit_resumes_exactly_and_then_says_the_run_is_complete(tmp_path):
    ref_job, _ = run(ToyConfig(output_dir=str(tmp_path / "ref")), tmp_path / "ref")
    cut = ToyConfig(output_dir=str(tmp_path / "cut"), max_steps=3, save_every=1)
    run(cut, tmp_path / "cut")
    resumed = dataclasses.replace(cut, max_steps=0, resume="auto")
    job, summary = run(resumed, tmp_path / "cut")
    assert summary["steps"] == 6 and summary["steps_this_run"] == 3
    for got, want in zip(job.model.parameters(), ref_job.model.parameters()):
        assert torch.equal(got, want)
    _, again = run(resumed, tmp_path / "cut")
    assert again["already_complete"] and again["steps_this_run"] == 0


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_NAN_AT_STEP, "3")
    with pytest.raises(NonFiniteLossError, match=r"loss is not finite at step 3 .*last good checkpoint: .*00000002"):
        run(ToyConfig(output_dir=str(tmp_path / "run")), tmp_path / "run")

"""Peak-memory prediction (mae_fast.memory): the tracker's byte counts, the fake-tensor trace against the same
tracker on a real CPU step, the batch / checkpointing planner and the out-of-memory message."""
import dataclasses

import pytest
import torch

from mae_fast import create_model
from mae_fast.memory import (GiB, LiveStorageTracker, StepTracer, checkpointing_choices, device_total_memory, oom_message, plan_batch, predict_memory, track_step)
from mae_fast.errors import MemoryPlanError
from mae_fast.train.engine.distributed import DistInfo
from mae_fast.train.engine.loop import StepRunner
from mae_fast.train.engine.optim import build_adamw

TINY = "mae_vit_tiny_patch8"


@pytest.fixture(scope="module")
def tracer():
    """One fake-tensor tiny model + AdamW + StepRunner (bf16, CPU target), shared: its traces are cached."""
    return StepTracer(TINY, 64, "bf16", device_type="cpu")


def test_tracker_counts_live_storages_views_once_and_sees_frees():
    tracker = LiveStorageTracker()
    with tracker:
        a = torch.randn(1000)                      # 4000 bytes
        v = a.view(10, 100)                        # a view: no new storage
        b = (v * 2).to(torch.float64)              # 4000 temporary, then 8000
        assert tracker.total == 4000 + 8000
        del b
        assert tracker.total == 4000
        tracker.retag(a, "inputs")
    assert tracker.current["inputs"] == 4000 and tracker.current["activations"] == 0
    assert tracker.peak == 4000 + 4000 + 8000  # a, the float32 product and its float64 copy at once
    del a, v
    assert tracker.total == 0


def test_tracker_rounds_like_the_cuda_allocator():
    tracker = LiveStorageTracker(round_to=512)
    with tracker:
        x = torch.ones(3)  # 12 bytes -> one 512-byte block
    assert tracker.total == 512
    del x


def _real_tiny_step(precision: str, batch: int, k: int):
    """The same tracker on a real CPU training step of the tiny model, optimizer state allocated first."""
    torch.manual_seed(0)
    model = create_model(TINY, norm_pix_loss=True).to(torch.float64 if precision == "fp64" else None)
    model.set_grad_checkpointing(k)
    model.train()
    opt = build_adamw(model, lr=1e-4, weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    runner = StepRunner(model, opt, precision, torch.device("cpu"), DistInfo())
    imgs = torch.randn(batch, 3, 64, 64, dtype=torch.float64 if precision == "fp64" else None)
    tracker = track_step(model, runner, imgs, precision, 0.75)
    return model, opt, tracker


@pytest.mark.parametrize("precision,k", [("bf16", 0), ("fp32", 1), ("fp64", 0)])
def test_fake_trace_predicts_the_tracked_real_step(precision, k, tracer):
    model, opt, real = _real_tiny_step(precision, 8, k)
    pred = (tracer.predict(8, k) if precision == "bf16" else
            predict_memory(TINY, 64, 8, precision, k, device_type="cpu"))
    assert pred.traced_on == "fake cpu tensors"
    assert abs(pred.peak_bytes - real.peak) <= 0.02 * real.peak, (pred.peak_bytes, real.peak)
    assert pred.peak_phase == real.peak_phase
    for cat in ("parameters", "optimizer_state", "inputs"):
        assert pred.breakdown[cat] == real.peak_breakdown[cat], cat
    # independent of the tracker: what lives between steps is exactly parameters + AdamW state (+ scalars)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
    assert param_bytes <= pred.between_steps_bytes - state_bytes <= param_bytes + 64
    assert pred.breakdown["parameters"] == param_bytes
    train_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert state_bytes - 2 * train_bytes == 4 * len(opt.state)  # exp_avg, exp_avg_sq and a float32 step each
    assert pred.breakdown["optimizer_state"] >= state_bytes
    assert pred.breakdown["inputs"] == 8 * 3 * 64 * 64 * (8 if precision == "fp64" else 4)
    assert pred.peak_bytes > pred.between_steps_bytes + pred.breakdown["inputs"]  # activations on top


def test_checkpointing_lowers_the_peak_and_batch_raises_it(tracer):
    p4, p8, p8k = tracer.predict(4, 0), tracer.predict(8, 0), tracer.predict(8, 1)
    assert p4.peak_bytes < p8.peak_bytes and p8k.peak_bytes < p8.peak_bytes
    assert p8k.breakdown["activations"] < p8.breakdown["activations"]


def test_cuda_target_without_gpu_is_emulated_on_cpu_and_says_so(tracer):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the trace runs on fake CUDA tensors")
    pred = predict_memory(TINY, 64, 4, "bf16", 0, device_type="cuda")
    assert pred.traced_on == "fake cpu tensors" and pred.kernel_backend == "torch"
    assert any("standing in for cuda" in a for a in pred.assumptions)
    assert pred.peak_bytes % 512 == 0
    assert pred.peak_bytes >= tracer.predict(4, 0).peak_bytes
    with pytest.raises(MemoryPlanError, match="--memory-budget"):
        device_total_memory()


def test_checkpointing_choices_least_to_most():
    assert checkpointing_choices(4, 2) == [0, 4, 3, 1]
    ch = checkpointing_choices(32, 8)
    assert ch[0] == 0 and ch[1] == 32 and ch[-1] == 1 and len(set(ch)) == len(ch)


def test_plan_batch_finds_the_largest_batch_then_the_least_checkpointing(tracer):
    budget = int(tracer.predict(37, 1).peak_bytes / 0.9) + 1  # batch 37 with every block checkpointed fits
    plan = plan_batch(TINY, 64, "bf16", budget, tracer=tracer)
    limit = int(budget * 0.9)
    assert plan.fits and plan.predicted_bytes <= limit
    assert tracer.predict(plan.batch_size + 1, 1).peak_bytes > limit  # the largest batch ...
    choices = checkpointing_choices(4, 2)
    i = choices.index(plan.grad_checkpointing)
    assert i == 0 or tracer.predict(plan.batch_size, choices[i - 1]).peak_bytes > limit  # ... the least ckpt
    assert plan.batch_size == 37 and plan.traces <= 10


def test_plan_least_checkpointing_at_a_fixed_batch(tracer):
    off, full = tracer.predict(16, 0).peak_bytes, tracer.predict(16, 1).peak_bytes
    budget = int((off + full) / 2 / 0.9)
    plan = plan_batch(TINY, 64, "bf16", budget, batch=16, tracer=tracer)
    assert plan.batch_size == 16 and plan.grad_checkpointing != 0 and plan.fits


def test_nothing_fits_is_one_line_naming_the_prediction(tracer):
    with pytest.raises(MemoryPlanError) as e:
        plan_batch(TINY, 64, "bf16", 2**20, tracer=tracer)  # 1 MiB: not even the parameters + AdamW state
    msg = str(e.value)
    assert "\n" not in msg and "nothing fits 1.0 MiB" in msg and "batch 1" in msg


def test_oom_message(tracer):
    pred = tracer.predict(8, 0)
    msg = oom_message(pred, budget_bytes=80 * GiB)
    assert "\n" not in msg and msg.startswith("out of memory on a 80.00 GiB device")
    assert "predicted peak" in msg and "--grad-checkpointing 1" in msg and "--batch-size auto" in msg
    tries, plan_cmd = msg.split("(plan: ")
    assert "--precision" not in tries and "--memory-budget 80" in plan_cmd  # bf16 already
    assert "--precision bf16" in oom_message(dataclasses.replace(pred, precision="fp32"), 80 * GiB).split("(plan")[0]

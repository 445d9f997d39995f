"""``mae-profile``: where the time, FLOPs and memory of an MAE training step go, phase by phase.

The step's peak memory is also predicted before the run (``--memory``, no GPU needed) or planned
(``--batch-size auto``, ``--grad-checkpointing auto``).

    mae-profile --model mae_vit_large_patch16 --batch-size 64                 # phases of real steps
    mae-profile --device cpu --model mae_vit_tiny_patch8 --batch-size 8 --plot phases.png --json phases.json
    mae-profile --model mae_vit_huge_patch14 --img-size 448 --batch-size 32 --trace runs/trace
    mae-profile --memory --model mae_vit_huge_patch14 --img-size 448 --batch-size 32,64 --grad-checkpointing 0,1
    mae-profile --memory --model mae_vit_huge_patch14 --img-size 448 --batch-size auto --memory-budget 80

A step is timed in phases after warm-up: masking + visible-patch embedding, encoder blocks, decoder embed +
unshuffle, decoder blocks + prediction, loss, backward of loss + decoder, backward of the encoder, optimizer,
and (with ``--data``) waiting for data. The forward runs the model's own pieces in the order ``forward`` runs
them; the backward is split where the latent's gradient arrives (a tensor hook). On CUDA the boundaries are
CUDA events read after the step (no other sync inside it); on CPU wall clock.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mae_fast.attention import BACKEND_NAMES
from mae_fast.compile import COMPILE_MODES, apply_compile
from mae_fast.device import DEVICE_CHOICES, PRECISION_DTYPES, autocast_for, resolve_device
from mae_fast.errors import DeviceError, MemoryPlanError
from mae_fast.flops import FlopsReport, count_flops
from mae_fast.kernels import KERNEL_BACKENDS
from mae_fast.memory import GiB, MemoryPrediction, Plan, StepTracer, fmt_bytes, oom_message, plan_batch, predict_memory
from mae_fast.model_spec import ModelSpec, build_model
from mae_fast.models_mae import ACTIVATION_DTYPES, MODELS, MaskedAutoencoderViT
from mae_fast.train.engine.loop import adamw_step

from .records import DefaultsHelpFormatter, record_header, write_result

PROG = "mae-profile"


@dataclass(frozen=True)
class Phase:
    """One phase of a training step and the ``mae-flops`` parts (name, "forward" | "backward") it computes."""

    key: str
    label: str
    flops: Tuple[Tuple[str, str], ...] = ()


_DEC = ("pred_head", "decoder_linear", "decoder_attention", "decoder_embed")
PHASES: Tuple[Phase, ...] = (
    Phase("data", "waiting for data"),
    Phase("mask_embed", "masking + visible-patch embedding", (("patch_embed", "forward"),)),
    Phase("encoder", "encoder blocks", (("encoder_linear", "forward"), ("encoder_attention", "forward"))),
    Phase("decoder_embed", "decoder embed + unshuffle", (("decoder_embed", "forward"),)),
    Phase("decoder", "decoder blocks + prediction",
          (("decoder_linear", "forward"), ("decoder_attention", "forward"), ("pred_head", "forward"))),
    Phase("loss", "loss", (("loss", "forward"),)),
    Phase("backward_decoder", "backward: loss + decoder", (("loss", "backward"), *((p, "backward") for p in _DEC))),
    Phase("backward_encoder", "backward: encoder",
          (("encoder_linear", "backward"), ("encoder_attention", "backward"), ("patch_embed", "backward"))),
    Phase("optimizer", "optimizer (fused AdamW) + zero_grad"),
)
PHASE_BY_KEY = {p.key: p for p in PHASES}
FORWARD_KEYS = ("mask_embed", "encoder", "decoder_embed", "decoder", "loss")


def phase_flops(report: FlopsReport, batch: int) -> Dict[str, float]:
    """FLOPs of each phase for ``batch`` images, from the ``mae-flops`` parts (0 for data and optimizer)."""
    parts = {p.name: p for p in report.parts}
    return {ph.key: batch * sum(getattr(parts[name], kind) for name, kind in ph.flops) for ph in PHASES}


# ----------------------------------------------------------------------------- the phased step
def phased_forward(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float,
                   mark: Callable[[str], None], noise: Optional[torch.Tensor] = None):
    """``model(imgs, mask_ratio, noise)`` in the model's public pieces, in ``forward``'s order, calling
    ``mark(phase)`` as each forward phase ends. Returns (loss, pred, mask, latent)."""
    x, mask, ids_restore = model.embed_visible(imgs, mask_ratio, noise)
    mark("mask_embed")
    latent = model.norm(model._run_blocks(model.blocks, x))
    mark("encoder")
    x = model.embed_decoder(latent, ids_restore)
    mark("decoder_embed")
    x = model._run_blocks(model.decoder_blocks, x)
    pred = model.decoder_pred(model.decoder_norm(x))[:, 1:, :]
    del x
    mark("decoder")
    loss = model.forward_loss(imgs, pred, mask)
    mark("loss")
    return loss, pred, mask, latent


class PhaseClock:
    """Timestamps at phase boundaries: CUDA events on the current stream, read after the step (no host
    sync inside it), or wall clock on CPU. ``mark(phase)`` ends ``phase``; it may be called from the
    autograd thread (a backward hook)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._t0 = None
        self._marks: List[Tuple[str, object]] = []

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self._marks = []
        self._t0 = self._now()

    def mark(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def durations(self) -> Dict[str, float]:
        """Seconds per phase, in order (waits for the last event on CUDA)."""
        out, prev = {}, self._t0
        if self.cuda and self._marks:
            self._marks[-1][1].synchronize()
        for phase, t in self._marks:
            out[phase] = (prev.elapsed_time(t) / 1e3) if self.cuda else (t - prev)
            prev = t
        return out


class TraceRanges:
    """The phases as torch.profiler ranges (``record_function``), each opened and closed on one thread:
    forward phases and the optimizer on the main thread, the two backward phases on the autograd thread."""

    def __init__(self):
        self._open: Dict[str, torch.autograd.profiler.record_function] = {}

    def begin(self, key: str) -> None:
        rf = torch.autograd.profiler.record_function(f"{PROG}: {PHASE_BY_KEY[key].label}")
        rf.__enter__()
        self._open[key] = rf

    def end(self, key: str) -> None:
        rf = self._open.pop(key, None)
        if rf is not None:
            rf.__exit__(None, None, None)

    @contextlib.contextmanager
    def range(self, key: str):
        self.begin(key)
        try:
            yield
        finally:
            self.end(key)

    def forward_mark(self, clock_mark: Callable[[str], None]) -> Callable[[str], None]:
        """A ``mark`` for phased_forward that also ends this range and begins the next forward one."""
        def mark(key: str) -> None:
            clock_mark(key)
            self.end(key)
            i = FORWARD_KEYS.index(key)
            if i + 1 < len(FORWARD_KEYS):
                self.begin(FORWARD_KEYS[i + 1])
        return mark

    def backward_hooks(self, loss: torch.Tensor, latent: torch.Tensor) -> None:
        def first(grad):
            self.begin("backward_decoder")

        def at_latent(grad):
            self.end("backward_decoder")
            self.begin("backward_encoder")
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self.end("backward_encoder"))

        loss.register_hook(first)
        latent.register_hook(at_latent)


def phased_step(model: MaskedAutoencoderViT, runner, next_batch: Callable[[], torch.Tensor], precision: str,
                mask_ratio: float, clock: PhaseClock, step: int, with_data: bool,
                ranges: Optional[TraceRanges] = None) -> Dict[str, float]:
    """One training step (forward, ``StepRunner`` backward and optimizer step), timed per phase."""
    device = next(model.parameters()).device
    clock.start()
    with (ranges.range("data") if ranges and with_data else contextlib.nullcontext()):
        imgs = next_batch()
        if with_data:
            clock.mark("data")
    mark = clock.mark
    if ranges:
        ranges.begin(FORWARD_KEYS[0])
        mark = ranges.forward_mark(clock.mark)
    with autocast_for(precision, device):
        loss, pred, mask, latent = phased_forward(model, imgs, mask_ratio, mark)
    images = imgs.shape[0]
    del pred, mask, imgs  # as in training, only the loss (and what autograd saved) lives on
    latent.register_hook(lambda grad: clock.mark("backward_decoder"))
    if ranges:
        ranges.backward_hooks(loss, latent)
    del latent
    with (torch.autograd.profiler.record_function(f"{PROG}: backward") if ranges else contextlib.nullcontext()):
        runner.backward(loss, 0, images)
    del loss
    clock.mark("backward_encoder")
    with (ranges.range("optimizer") if ranges else contextlib.nullcontext()):
        runner.optimizer_step(step)
        clock.mark("optimizer")
    return clock.durations()


# ----------------------------------------------------------------------------- timing a run
def model_spec(args: argparse.Namespace, **overrides) -> ModelSpec:
    """The model configuration of the command line (norm-pix loss, mae-pretrain's default), ``overrides`` first."""
    return ModelSpec.from_options(args, norm_pix_loss=True, **overrides)


def memory_tracer(args: argparse.Namespace, device_type: str) -> StepTracer:
    """The memory planner's tracer of the command line's model and mae-pretrain's step (each trace sets its own
    batch and checkpointing)."""
    return StepTracer(model_spec(args, batch_size=1, grad_checkpointing=0), adamw_step(args.precision),
                      device_type)


def build_training(args: argparse.Namespace, device: torch.device):
    """(model, StepRunner, concrete compile mode) as mae-pretrain builds them for one process."""
    torch.manual_seed(0)
    model = build_model(model_spec(args), device)
    compiled = apply_compile(model, args.compile, device)
    return model, adamw_step(args.precision)(model, device), compiled


def batch_source(args: argparse.Namespace, device: torch.device) -> Callable[[], torch.Tensor]:
    """The next batch on the device: from the loader over ``--data`` (cycled), or one fixed random batch."""
    dtype = torch.float64 if args.precision == "fp64" else torch.float32
    if not args.data:
        fixed = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device, dtype=dtype)
        return lambda: fixed
    from mae_fast.train.data.loaders import build_loader

    loader = build_loader(args.data, batch_size=args.batch_size, img_size=args.img_size, device=device,
                          drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"--data {args.data}: fewer images than one batch of {args.batch_size}")
    it = iter(loader)

    def next_batch() -> torch.Tensor:
        nonlocal it
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        return batch.to(device, dtype, non_blocking=True)
    return next_batch


def predict_for(args: argparse.Namespace, model: MaskedAutoencoderViT, device: torch.device) -> MemoryPrediction:
    """The prediction for the run about to be timed: its spec, with the attention and kernels its model resolved."""
    spec = model_spec(args, attn_backend=model.blocks[0].attn.attn_backend, kernel_backend=model.kernel_backend)
    return predict_memory(spec, adamw_step(args.precision), device.type)


def summarize(steps: List[Tuple[Dict[str, float], float]], flops: Dict[str, float]) -> Dict:
    """Per phase over the timed steps: mean (the phases' means add up to the mean step), median, min, max,
    share of the mean step, FLOPs and achieved TFLOP/s."""
    keys = [p.key for p in PHASES if p.key in steps[0][0]]
    walls = [w for _, w in steps]
    step_mean = statistics.fmean(walls)
    rows = []
    for k in keys:
        ts = [d[k] for d, _ in steps]
        mean = statistics.fmean(ts)
        rows.append({"phase": k, "label": PHASE_BY_KEY[k].label, "ms": mean * 1e3,
                     "ms_median": statistics.median(ts) * 1e3, "ms_min": min(ts) * 1e3, "ms_max": max(ts) * 1e3,
                     "share": mean / step_mean, "gflop": flops[k] / 1e9,
                     "tflops": (flops[k] / mean / 1e12) if flops[k] and mean > 0 else None})
    ratios = [sum(d.values()) / w for d, w in steps]
    return {"phases": rows, "step_ms": step_mean * 1e3, "step_ms_median": statistics.median(walls) * 1e3,
            "step_ms_min": min(walls) * 1e3, "step_ms_max": max(walls) * 1e3,
            "phases_sum_ms": statistics.fmean(sum(d.values()) for d, _ in steps) * 1e3,
            "phases_over_step": {"mean": statistics.fmean(ratios), "min": min(ratios), "max": max(ratios)}}


def write_trace(trace_dir: str, run_step: Callable[[Optional[TraceRanges]], object], cuda: bool) -> List[str]:
    """A torch.profiler trace of two steps (after one warm-up) with the phases as named ranges, written by
    ``tensorboard_trace_handler`` (Chrome-trace JSON: TensorBoard's profiler plugin, Perfetto, chrome://tracing)."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    Path(trace_dir).mkdir(parents=True, exist_ok=True)
    before = set(Path(trace_dir).glob("*.json"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():  # "Profiler clears events at the end of each cycle": there is one cycle
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=2),
                     on_trace_ready=tensorboard_trace_handler(trace_dir)) as prof:
            for _ in range(3):
                run_step(TraceRanges())
                prof.step()
    return sorted(str(p) for p in set(Path(trace_dir).glob("*.json")) - before)


def profile_run(args: argparse.Namespace) -> Dict:
    """Time ``args.steps`` training steps per phase after ``args.warmup``; the JSON record."""
    device = resolve_device(args.device)
    plan: Optional[Plan] = None
    if args.batch_size is None or args.grad_checkpointing is None:
        plan = plan_batch(memory_tracer(args, device.type), _budget(args), batch=args.batch_size,
                          grad_checkpointing=args.grad_checkpointing, headroom=args.headroom)
        args.batch_size, args.grad_checkpointing = plan.batch_size, plan.grad_checkpointing
        print(plan.describe(), flush=True)
    model, runner, compiled = build_training(args, device)
    prediction = predict_for(args, model, device)
    next_batch = batch_source(args, device)
    flops = phase_flops(count_flops(args.model, args.mask_ratio, img_size=args.img_size, norm_pix_loss=True),
                        args.batch_size)
    clock = PhaseClock(device)
    model.train()

    def run_step(step: int, ranges: Optional[TraceRanges] = None) -> Dict[str, float]:
        return phased_step(model, runner, next_batch, args.precision, args.mask_ratio, clock, step,
                           bool(args.data), ranges)

    steps: List[Tuple[Dict[str, float], float]] = []
    try:
        for i in range(args.warmup + args.steps):
            if i == args.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            phases = run_step(i)  # waits for the step's last event on CUDA
            wall = time.perf_counter() - t0
            if i >= args.warmup:
                steps.append((phases, wall))
        measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        runner.check(None)  # raises if a step had a non-finite loss
        traces = write_trace(args.trace, lambda r: run_step(args.warmup + args.steps, r),
                             device.type == "cuda") if args.trace else []
    except torch.cuda.OutOfMemoryError:
        raise MemoryPlanError(oom_message(prediction)) from None
    record = {
        **record_header(PROG, device, " ".join([PROG, *args.argv])),
        "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size, "precision": args.precision,
        "compile": compiled, "grad_checkpointing": args.grad_checkpointing, "mask_ratio": args.mask_ratio,
        "attn_backend": model.blocks[0].attn.attn_backend, "kernel_backend": model.kernel_backend,
        "data": args.data, "steps": args.steps, "warmup": args.warmup,
        "timing": "CUDA events at phase boundaries" if device.type == "cuda" else "wall clock at phase boundaries",
        "flops": "mae-flops analytic counts (model FLOPs: recomputation under checkpointing not counted)",
        **summarize(steps, flops),
        "memory": {"predicted_bytes": prediction.peak_bytes, "measured_bytes": measured,
                   "measured_over_predicted": (measured / prediction.peak_bytes) if measured else None,
                   "measured_with": "torch.cuda.max_memory_allocated over the timed steps" if measured else None,
                   "prediction": prediction.to_dict()},
        "plan": plan.to_dict() if plan else None, "trace_files": traces,
    }
    return record


def _budget(args: argparse.Namespace) -> Optional[int]:
    return int(args.memory_budget[0] * GiB) if args.memory_budget else None


def format_profile(rec: Dict) -> str:
    ckpt = rec["grad_checkpointing"] or "off"
    lines = [f"{rec['model']} @ {rec['img_size']}px, batch {rec['batch_size']}, {rec['precision']}, compile "
             f"{rec['compile']}, grad checkpointing {ckpt}, {rec['device']}: {rec['steps']} steps after "
             f"{rec['warmup']} warm-up ({rec['timing']})",
             f"{'phase':<38}{'mean ms':>10}{'median':>10}{'min-max':>18}{'share':>8}{'GFLOP':>11}{'TFLOP/s':>9}"]
    for r in rec["phases"]:
        tf = f"{r['tflops']:.2f}" if r["tflops"] is not None else "-"
        gf = f"{r['gflop']:.1f}" if r["gflop"] else "-"
        span = f"{r['ms_min']:.2f}-{r['ms_max']:.2f}"
        lines.append(f"{r['label']:<38}{r['ms']:>10.2f}{r['ms_median']:>10.2f}{span:>18}{r['share']:>8.1%}"
                     f"{gf:>11}{tf:>9}")
    o = rec["phases_over_step"]
    lines.append(f"{'sum of phases':<38}{rec['phases_sum_ms']:>10.2f}")
    span = f"{rec['step_ms_min']:.2f}-{rec['step_ms_max']:.2f}"
    lines.append(f"{'step (measured around it)':<38}{rec['step_ms']:>10.2f}{rec['step_ms_median']:>10.2f}{span:>18}"
                 f"   phases / step {o['mean']:.1%} ({o['min']:.1%}-{o['max']:.1%})")
    m = rec["memory"]
    line = f"memory: predicted peak {fmt_bytes(m['predicted_bytes'])} ({m['prediction']['traced_on']})"
    if m["measured_bytes"] is not None:
        line += (f", measured {fmt_bytes(m['measured_bytes'])} (torch.cuda.max_memory_allocated): "
                 f"measured / predicted {m['measured_over_predicted']:.3f}")
    lines.append(line)
    if rec["compile"] != "off":
        lines.append("  (the prediction is for the eager step; torch.compile changes what is saved)")
    lines += [f"trace: {f}" for f in rec["trace_files"]]
    return "\n".join(lines)


def plot_phases(rec: Dict, path: str) -> None:
    """One horizontal bar of the mean step, stacked by phase, labelled with ms and share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 2.8))
    left = 0.0
    colors = plt.get_cmap("tab10").colors
    for i, r in enumerate(rec["phases"]):
        ax.barh([0], [r["ms"]], left=left, color=colors[i % len(colors)],
                label=f"{r['label']}: {r['ms']:.1f} ms ({r['share']:.0%})")
        left += r["ms"]
    ax.axvline(rec["step_ms"], color="black", linestyle="--", linewidth=1, label="measured step")
    ax.set_yticks([])
    ax.set_xlabel("ms per step (mean over the timed steps)")
    ax.set_title(f"{rec['model']} @ {rec['img_size']}px, batch {rec['batch_size']}, {rec['precision']}, "
                 f"{rec['device']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- --memory
def memory_report(args: argparse.Namespace) -> Dict:
    """Predictions for every (batch, checkpointing) asked for, or the plan for ``auto``; the JSON record."""
    device_type = "cpu" if args.device == "cpu" else "cuda"
    tracer = memory_tracer(args, device_type)
    plan = None
    if args.batch_sizes == [None] or args.checkpointings == [None]:
        if len(args.batch_sizes) > 1 or len(args.checkpointings) > 1 or len(args.memory_budget or []) > 1:
            raise ValueError("--batch-size auto / --grad-checkpointing auto take one value of each option "
                             "(and one --memory-budget)")
        plan = plan_batch(tracer, _budget(args), batch=args.batch_sizes[0], grad_checkpointing=args.checkpointings[0],
                          headroom=args.headroom)
        rows = [plan.prediction]
    else:
        rows = [tracer.predict(b, k) for b in args.batch_sizes for k in args.checkpointings]
    budgets = args.memory_budget or ([plan.budget_bytes / GiB] if plan else [])
    return {"benchmark": "mae-profile --memory", "command": " ".join([PROG, *args.argv]), "model": args.model,
            "img_size": args.img_size, "precision": args.precision, "device_type": device_type,
            "headroom": args.headroom, "budgets_gib": budgets, "plan": plan.to_dict() if plan else None,
            "predictions": [p.to_dict() for p in rows], "assumptions": tracer.assumptions()}


def format_memory(rec: Dict, markdown: bool = False) -> str:
    """The predictions as a table (GiB, or MiB below 1 GiB), with a fits column per budget (peak <= budget
    less headroom)."""
    preds = rec["predictions"]
    unit, div = ("GiB", GiB) if max(p["peak_bytes"] for p in preds) >= GiB else ("MiB", 2**20)
    head = ["batch", "checkpointing", "parameters", "gradients", "optimizer", "inputs", "activations",
            f"peak {unit}", "peak in"] + [f"fits {b:g} GiB" for b in rec["budgets_gib"]]
    rows = []
    for p in preds:
        b = p["breakdown"]
        fits = ["yes" if p["peak_bytes"] <= g * GiB * (1 - rec["headroom"]) else "no" for g in rec["budgets_gib"]]
        rows.append([str(p["batch_size"]), f"every {p['grad_checkpointing']}" if p["grad_checkpointing"] else "off",
                     *(f"{b[c] / div:.2f}" for c in ("parameters", "gradients", "optimizer_state", "inputs",
                                                     "activations")),
                     f"{p['peak_bytes'] / div:.2f}", p["peak_phase"], *fits])
    first = preds[0]
    title = (f"{rec['model']} @ {rec['img_size']}px, {rec['precision']}, AdamW (fused), mask ratio "
             f"{first['mask_ratio']:g}: predicted peak memory ({unit}) of one training step on {rec['device_type']} "
             f"(traced on {first['traced_on']}; fits: peak <= budget less {rec['headroom']:.0%} headroom)")
    if markdown:
        out = [title, "", "| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        out = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
        out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if markdown:
        out.append("")  # a blank line ends a markdown table
    out.append(memory_phase_note(preds, unit, div))
    if rec["plan"]:
        out += ["", rec["plan"]["summary"]]
    return "\n".join(out)


def memory_phase_note(preds: List[Dict], unit: str, div: float) -> str:
    """One line under the --memory table: why gradients are ~0 at a backward peak, and the optimizer step's own
    peak per row (``phase_peaks["optimizer"]`` of the prediction)."""
    opt = ", ".join(f"{p['phase_peaks']['optimizer'] / div:.2f}" for p in preds)
    per_row = " (per row)" if len(preds) > 1 else ""
    return (f"columns: the split at each row's peak; a backward peak with gradients ~0 came as backward started, "
            f"with every saved activation live and few gradients yet; the optimizer step's own peak (all gradients "
            f"and the AdamW state live): {opt} {unit}{per_row}")


# ----------------------------------------------------------------------------- command line
def _auto_or_ints(text: str, flag: str) -> List[Optional[int]]:
    if text == "auto":
        return [None]
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes 'auto' or integers (comma-separated), got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{flag} is empty")
    return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="mae_vit_large_patch16", choices=sorted(MODELS), help="model factory name")
    p.add_argument("--img-size", type=int, default=224, help="image side in pixels")
    p.add_argument("--batch-size", default="64",
                   help="images per step, or auto (the largest that fits the memory budget); --memory takes a "
                        "comma-separated list")
    p.add_argument("--grad-checkpointing", default="0",
                   help="recompute every k-th block (0: off), or auto (the least that fits); --memory takes a list")
    p.add_argument("--precision", choices=sorted(PRECISION_DTYPES), default="bf16",
                   help="bf16 | fp16 (autocast) | fp32 | fp64 (float64 weights and images); stepped as mae-pretrain "
                        "does: a GradScaler, dynamic under fp16, else at scale 1 (it only skips non-finite updates)")
    p.add_argument("--compile", choices=[m for m in COMPILE_MODES if m != "model"], default="auto",
                   help="torch.compile per block (auto: blocks on CUDA, off on CPU); 'model' would hide the phases")
    p.add_argument("--attn-backend", default="auto", choices=BACKEND_NAMES, help="attention (auto: timed per site)")
    p.add_argument("--kernel-backend", default="auto", choices=KERNEL_BACKENDS,
                   help="fused ops (auto: Triton on CUDA after a self-test, else the PyTorch references)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed")
    p.add_argument("--activation-dtype", default="fp32", choices=sorted(ACTIVATION_DTYPES),
                   help="residual stream between blocks, as mae-pretrain's (bf16 needs --precision bf16)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="where to run (with --memory: the device predicted for; auto = cuda)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotune, allocator)")
    p.add_argument("--data", default=None, help="feed the steps from the real loader over this folder")
    p.add_argument("--json", default=None, help="also write the record here (a timed run on CUDA always writes it "
                   "to bench/results/)")
    p.add_argument("--plot", default=None, help="stacked-bar PNG of the phases")
    p.add_argument("--trace", default=None, help="write a torch.profiler trace (phases as named ranges) here")
    p.add_argument("--memory", action="store_true", help="only predict the peak memory (no GPU needed)")
    p.add_argument("--memory-budget", default=None,
                   help="GiB (comma-separated for several fits columns); default: the CUDA device's total memory")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of the budget kept free when planning")
    p.add_argument("--markdown", action="store_true", help="--memory: print the table as markdown")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        args.batch_sizes = _auto_or_ints(args.batch_size, "--batch-size")
        args.checkpointings = _auto_or_ints(args.grad_checkpointing, "--grad-checkpointing")
        args.memory_budget = ([float(v) for v in args.memory_budget.split(",")] if args.memory_budget else None)
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e) if isinstance(e, argparse.ArgumentTypeError) else f"--memory-budget takes GiB numbers: {e}")
    if any(b is not None and b < 1 for b in args.batch_sizes):
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if any(k is not None and k < 0 for k in args.checkpointings):
        p.error(f"--grad-checkpointing must be >= 0, got {args.grad_checkpointing}")
    if args.memory_budget and any(b <= 0 for b in args.memory_budget):
        p.error(f"--memory-budget must be > 0 GiB, got {args.memory_budget}")
    if not 0 <= args.headroom < 1:
        p.error(f"--headroom must be in [0, 1), got {args.headroom}")
    if args.activation_dtype == "bf16" and args.precision != "bf16":
        p.error("--activation-dtype bf16 needs --precision bf16 (the residual stream is kept in autocast's dtype)")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if not args.memory:
        if len(args.batch_sizes) > 1 or len(args.checkpointings) > 1:
            p.error("lists of --batch-size / --grad-checkpointing are for --memory; time one configuration")
        args.batch_size, args.grad_checkpointing = args.batch_sizes[0], args.checkpointings[0]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        rec = memory_report(args) if args.memory else profile_run(args)
    except MemoryPlanError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, DeviceError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.memory:
        print(format_memory(rec, args.markdown))
    else:
        print(format_profile(rec))
        if not rec["device"].startswith("cpu"):
            print(f"wrote {write_result(f'mae-profile-{args.model}-{args.img_size}', rec)}")
        if args.plot:
            plot_phases(rec, args.plot)
            print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

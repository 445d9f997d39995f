"""Peak memory of one MAE training step, predicted before the run: the real step (forward under autocast,
``StepRunner`` backward, fused AdamW ``build_adamw``) is run on fake tensors (``FakeTensorMode``: shapes and
dtypes, no data, no compute), and a dispatch-level tracker adds up the bytes of the tensor storages alive
after every op, by category. Seconds even for ViT-H/14 at 448 px and batch 256.

What the tracker sees is every tensor an aten op returns (parameters, gradients, optimizer state, the input
batch, saved activations, backward temporaries, autocast's casted weights); what no dispatch-level tracker
sees is memory a kernel allocates for itself (cuBLAS and flash-attention workspaces, a few tens of MiB).

Without a GPU the step is traced on fake CPU tensors standing in for CUDA (PyTorch's autograd engine runs
no backward on fake CUDA tensors without a CUDA driver); the assumptions this makes are in
``MemoryPrediction.assumptions`` and docs/memory.md. On a machine with a GPU it is traced on fake CUDA
tensors, with the device's autocast, SDPA choice and Triton ops (their registered fake implementations).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .device import PRECISION_DTYPES, autocast_for
from .models_mae import MaskedAutoencoderViT, create_model
from .errors import MemoryPlanError

GiB = 2**30
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes
CATEGORIES = ("parameters", "gradients", "optimizer_state", "inputs", "activations")


def fmt_bytes(n: float) -> str:
    """Bytes as GiB (from 1 GiB) or MiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"



# ----------------------------------------------------------------------------- the tracker
class LiveStorageTracker(TorchDispatchMode):
    """Bytes of live tensor storages by category, and the peak with its breakdown and phase.

    Every storage an op returns is counted once when it first appears (under the current ``category``)
    and uncounted when it is freed (a weakref callback on the storage); views share their base's storage.
    ``add`` registers tensors made before tracking (parameters, optimizer state, inputs); ``retag`` moves a
    storage to another category (a gradient once it is accumulated into ``.grad``).
    """

    def __init__(self, round_to: int = 1):
        super().__init__()
        self.round_to = round_to
        self.category = "activations"
        self.phase = "forward"
        self.current: Dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_breakdown: Dict[str, int] = dict(self.current)
        self.peak_phase = "before"
        self.phase_peaks: Dict[str, int] = {}
        self._live: Dict[int, list] = {}  # id(storage) -> [bytes, category, weakref]

    def _nbytes(self, storage: torch.UntypedStorage) -> int:
        n = storage.nbytes()
        return -(-n // self.round_to) * self.round_to

    def _freed(self, key: int, _ref: weakref.ref) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current[entry[1]] -= entry[0]
            self.total -= entry[0]

    def add(self, tensor: torch.Tensor, category: str) -> None:
        """Count ``tensor``'s storage under ``category`` unless it is counted already."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (e.g. some subclasses): nothing to count
            return
        key = id(storage)
        if key in self._live:
            return
        nbytes = self._nbytes(storage)
        self._live[key] = [nbytes, category, weakref.ref(storage, lambda r, k=key: self._freed(k, r))]
        self.current[category] += nbytes
        self.total += nbytes
        self._update_peak()

    def retag(self, tensor: torch.Tensor, category: str) -> None:
        """Move ``tensor``'s storage to ``category`` (counting it there if it was not counted)."""
        entry = self._live.get(id(tensor.untyped_storage()))
        if entry is None:
            self.add(tensor, category)
        elif entry[1] != category:
            self.current[entry[1]] -= entry[0]
            self.current[category] += entry[0]
            entry[1] = category

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_peaks.setdefault(phase, self.total)

    def _update_peak(self) -> None:
        if self.phase in self.phase_peaks and self.total > self.phase_peaks[self.phase]:
            self.phase_peaks[self.phase] = self.total
        if self.total > self.peak:
            self.peak = self.total
            self.peak_breakdown = dict(self.current)
            self.peak_phase = self.phase

    def reset_peak(self) -> None:
        self.peak, self.peak_breakdown, self.peak_phase = self.total, dict(self.current), "before"
        self.phase_peaks = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, self.category)
        return out


@contextlib.contextmanager
def gradients_tagged(tracker: LiveStorageTracker, model: nn.Module) -> Iterator[None]:
    """While active, each parameter's ``.grad`` is retagged as "gradients" as soon as it is accumulated."""
    handles = [p.register_post_accumulate_grad_hook(lambda q: tracker.retag(q.grad, "gradients"))
               for p in model.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def track_training_state(tracker: LiveStorageTracker, model: nn.Module, optimizer: torch.optim.Optimizer,
                         extra: Iterable[torch.Tensor] = ()) -> None:
    """Register what lives between steps: parameters, existing gradients, optimizer state, ``extra``."""
    for p in model.parameters():
        tracker.add(p, "parameters")
        if p.grad is not None:
            tracker.add(p.grad, "gradients")
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                tracker.add(v, "optimizer_state")
    for t in extra:
        tracker.add(t, "optimizer_state")


# ----------------------------------------------------------------------------- the prediction
@dataclass
class MemoryPrediction:
    """Predicted peak bytes of one steady-state training step (optimizer state already allocated)."""

    model: str
    img_size: int
    batch_size: int
    precision: str
    grad_checkpointing: int
    mask_ratio: float
    device_type: str
    traced_on: str
    kernel_backend: str
    attn_backend: str
    peak_bytes: int
    peak_phase: str
    breakdown: Dict[str, int]
    phase_peaks: Dict[str, int]
    between_steps_bytes: int
    assumptions: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_gib"] = self.peak_bytes / GiB
        return d

    def describe(self) -> str:
        """One line: the configuration, the peak and its parts."""
        b = self.breakdown
        ckpt = f"every {self.grad_checkpointing} block(s)" if self.grad_checkpointing else "off"
        parts = ", ".join(f"{name} {fmt_bytes(b[c])}" for name, c in (
            ("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "optimizer_state"),
            ("inputs", "inputs"), ("activations", "activations")))
        return (f"{self.model} @ {self.img_size}px, batch {self.batch_size}, {self.precision}, grad checkpointing "
                f"{ckpt}: predicted peak {fmt_bytes(self.peak_bytes)} (in {self.peak_phase}; {parts})")


class StepTracer:
    """The model, fused AdamW and ``StepRunner`` of one configuration, built once on fake tensors, so that
    many (batch, checkpointing) pairs can be traced in a row (``plan_batch``)."""

    def __init__(self, model_name: str, img_size: int = 224, precision: str = "bf16", mask_ratio: float = 0.75,
                 device_type: str = "cuda", trace_device: Optional[str] = None, kernel_backend: Optional[str] = None,
                 attn_backend: str = "sdpa", norm_pix_loss: bool = True, **model_kwargs):
        from mae_fast.train.engine.distributed import DistInfo
        from mae_fast.train.engine.loop import StepRunner
        from mae_fast.train.engine.optim import build_adamw

        if precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {list(PRECISION_DTYPES)}, got {precision!r}")
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
        if attn_backend == "auto":  # "auto" times the backends on the device: name the one it picked
            raise ValueError("attn_backend for a memory prediction must be concrete (sdpa | math | xformers), "
                             "not 'auto'")
        if trace_device is None:
            trace_device = "cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu"
        if kernel_backend is None:  # what the model would run on the target (auto); refs when emulated on CPU
            kernel_backend = "auto" if trace_device == device_type else "torch"
        self.model_name, self.img_size, self.precision, self.mask_ratio = model_name, img_size, precision, mask_ratio
        self.device_type, self.trace_device = device_type, trace_device
        self.kernel_backend, self.attn_backend = kernel_backend, attn_backend
        self.device = torch.device(trace_device)
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        default_dtype = torch.get_default_dtype()
        with self.fake_mode, torch.device(self.device):
            try:  # built in float64 for fp64: Module.to cannot swap fake parameters
                torch.set_default_dtype(torch.float64 if precision == "fp64" else torch.float32)
                model = create_model(model_name, img_size=img_size, norm_pix_loss=norm_pix_loss,
                                     attn_backend=attn_backend, kernel_backend=kernel_backend, **model_kwargs)
            finally:
                torch.set_default_dtype(default_dtype)
            model.train()
            optimizer = build_adamw(model, lr=1e-4, weight_decay=0.05)
            for p in model.parameters():  # allocate the optimizer state as after the first step
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.runner = StepRunner(model, optimizer, precision, self.device, DistInfo())
        self.model: MaskedAutoencoderViT = model
        self.optimizer = optimizer
        self._cache: Dict[Tuple[int, int], MemoryPrediction] = {}

    @property
    def depths(self) -> Tuple[int, int]:
        return len(self.model.blocks), len(self.model.decoder_blocks)

    def assumptions(self) -> List[str]:
        out = ["steady state: AdamW state allocated (as from the second step on); one input batch on the device",
               "eager step (no torch.compile); one process (no DDP buckets / FSDP sharding)",
               "kernel-internal workspaces (cuBLAS, flash-attention backward) are not seen"]
        if self.trace_device != self.device_type:
            out += [f"traced on fake {self.trace_device} tensors standing in for {self.device_type}: CPU autocast "
                    f"gives this model the same dtypes as CUDA autocast (the CUDA fp32-list ops it reaches, "
                    f"layer_norm / pow / sum, already get float32 inputs)",
                    f"attention {self.attn_backend}: the CPU fused SDPA kernel keeps, like CUDA flash / "
                    f"memory-efficient attention, only the output and the log-sum-exp per head",
                    f"kernel_backend {self.kernel_backend!r}: the PyTorch references keep slightly more than the "
                    f"Triton ops (about 1-2% of the peak), so the prediction errs high"]
        if self.device_type == "cuda":
            out.append(f"allocations rounded up to {CUDA_BLOCK} bytes as the CUDA caching allocator does")
        return out

    def predict(self, batch_size: int, grad_checkpointing: int = 0) -> MemoryPrediction:
        """Trace one training step at ``batch_size`` and checkpointing interval ``grad_checkpointing``."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        key = (batch_size, grad_checkpointing)
        if key not in self._cache:
            self._cache[key] = self._trace(batch_size, grad_checkpointing)
        return self._cache[key]

    def _trace(self, batch_size: int, grad_checkpointing: int) -> MemoryPrediction:
        model = self.model
        model.set_grad_checkpointing(grad_checkpointing)
        c = model.config
        dtype = torch.float64 if self.precision == "fp64" else torch.float32
        with self.fake_mode:
            imgs = torch.empty(batch_size, c.in_chans, c.img_size, c.img_size, dtype=dtype, device=self.device)
            tracker = track_step(model, self.runner, imgs, self.precision, self.mask_ratio,
                                 CUDA_BLOCK if self.device_type == "cuda" else 1)
            del imgs
            between = tracker.total  # what lives from one step to the next
        return MemoryPrediction(
            model=self.model_name, img_size=self.img_size, batch_size=batch_size, precision=self.precision,
            grad_checkpointing=grad_checkpointing, mask_ratio=self.mask_ratio, device_type=self.device_type,
            traced_on=f"fake {self.trace_device} tensors", kernel_backend=self.kernel_backend,
            attn_backend=self.attn_backend, peak_bytes=tracker.peak, peak_phase=tracker.peak_phase,
            breakdown=dict(tracker.peak_breakdown), phase_peaks=dict(tracker.phase_peaks),
            between_steps_bytes=between, assumptions=self.assumptions())


def track_step(model: MaskedAutoencoderViT, runner, imgs: torch.Tensor, precision: str, mask_ratio: float,
               round_to: int = 1) -> LiveStorageTracker:
    """Run one training step as mae-pretrain does (forward under autocast, ``runner.backward``,
    ``runner.optimizer_step``) under a tracker, on real or fake tensors; returns the tracker (``peak``,
    ``peak_breakdown``, ``peak_phase``; ``total`` keeps counting what lives on after the step)."""
    tracker = LiveStorageTracker(round_to)
    scaler = [t for t in (runner.scaler._scale, runner.scaler._growth_tracker) if t is not None]
    track_training_state(tracker, model, runner.optimizer,
                         [runner.bad_steps, runner.last_bad, runner.loss_sum, runner.loss_count, *scaler])
    tracker.add(imgs, "inputs")
    tracker.reset_peak()
    device = imgs.device
    with tracker, gradients_tagged(tracker, model):
        tracker.set_phase("forward")
        with autocast_for(precision, device):
            loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        tracker.set_phase("backward")
        runner.backward(loss, 0, imgs.shape[0])
        del loss
        tracker.set_phase("optimizer")
        tracker.category = "optimizer_state"
        runner.optimizer_step(0)
    return tracker


def predict_memory(model_name: str, img_size: int = 224, batch_size: int = 64, precision: str = "bf16",
                   grad_checkpointing: int = 0, **kwargs) -> MemoryPrediction:
    """Predicted peak memory of one training step (see the module doc); ``kwargs`` go to ``StepTracer``."""
    return StepTracer(model_name, img_size, precision, **kwargs).predict(batch_size, grad_checkpointing)


# ----------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """The chosen batch size and checkpointing interval, with the prediction behind them."""

    batch_size: int
    grad_checkpointing: int
    predicted_bytes: int
    budget_bytes: int
    headroom: float
    prediction: MemoryPrediction
    traces: int = 0

    @property
    def limit_bytes(self) -> int:
        return int(self.budget_bytes * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.predicted_bytes <= self.limit_bytes

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "grad_checkpointing": self.grad_checkpointing,
                "predicted_bytes": self.predicted_bytes, "budget_bytes": self.budget_bytes,
                "limit_bytes": self.limit_bytes, "headroom": self.headroom, "fits": self.fits,
                "traces": self.traces, "summary": self.describe(), "prediction": self.prediction.to_dict()}

    def describe(self) -> str:
        return (f"plan: batch {self.batch_size}, grad checkpointing {self.grad_checkpointing or 'off'}: predicted "
                f"{fmt_bytes(self.predicted_bytes)} of {fmt_bytes(self.budget_bytes)} ({self.headroom:.0%} "
                f"headroom: limit {fmt_bytes(self.limit_bytes)}; {self.traces} traces)")


def checkpointing_choices(depth: int, decoder_depth: int) -> List[int]:
    """Intervals k for ``set_grad_checkpointing(k)`` from least to most recomputation: 0 (off), then every
    k with a distinct number of checkpointed (encoder, decoder) blocks, down to 1 (every block)."""
    seen, out = set(), [0]
    for k in range(max(depth, decoder_depth), 0, -1):
        counts = (math.ceil(depth / k), math.ceil(decoder_depth / k))
        if counts not in seen:
            seen.add(counts)
            out.append(k)
    return out


def device_total_memory(device: Optional[torch.device] = None) -> int:
    """Total memory of the CUDA device in bytes; MemoryPlanError without one."""
    if not torch.cuda.is_available():
        raise MemoryPlanError("no CUDA device here to read the memory budget from: give --memory-budget GiB")
    return torch.cuda.get_device_properties(device or torch.cuda.current_device()).total_memory


def _largest_fitting(fits: Callable[[int], bool], peak_at: Callable[[int], int], limit: int, max_batch: int) -> int:
    """Largest batch b <= max_batch with fits(b); 0 if batch 1 does not fit. Powers of two up to the first
    that does not fit, then a bracketing search of the gap: each guess interpolates the peak (it grows almost
    linearly with the batch, so this lands next to the boundary), and a guess that does not halve the
    bracket is followed by a plain bisection step. The powers of two start from an affine estimate, so a
    large model needs a handful of traces, not one per power of two."""
    if not fits(1):
        return 0
    probe = min(64, max_batch)  # an affine estimate from batches 1 and 64 picks the power of two to start at
    estimate = 1 + (limit - peak_at(1)) * (probe - 1) // max(1, peak_at(probe) - peak_at(1))
    lo, hi = 1 << (max(1, min(estimate, max_batch)).bit_length() - 1), None
    while lo > 1 and not fits(lo):
        lo //= 2
    while hi is None:
        nxt = min(lo * 2, max_batch)
        if nxt == lo:
            return lo
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    bisect = False
    while hi - lo > 1:
        width = hi - lo
        if bisect:
            mid = (lo + hi) // 2
        else:
            p_lo, p_hi = peak_at(lo), peak_at(hi)
            mid = min(max(lo + (limit - p_lo) * width // max(1, p_hi - p_lo), lo + 1), hi - 1)
        if fits(mid):
            lo = mid
            if not bisect and hi - lo > 1:  # an interpolated guess lands next to the boundary: try across it
                lo, hi = (mid + 1, hi) if fits(mid + 1) else (lo, mid + 1)
        else:
            hi = mid
            if not bisect and hi - lo > 1:
                lo, hi = (mid - 1, hi) if fits(mid - 1) else (lo, mid - 1)
        bisect = not bisect and (hi - lo) > width // 2
    return lo


def plan_batch(model_name: str, img_size: int = 224, precision: str = "bf16", budget_bytes: Optional[int] = None,
               batch: Optional[int] = None, grad_checkpointing: Optional[int] = None, headroom: float = 0.10,
               max_batch: int = 8192, tracer: Optional[StepTracer] = None, **tracer_kwargs) -> Plan:
    """Choose what ``None`` leaves open: the largest ``batch`` that fits ``budget_bytes`` less ``headroom``
    (with ``grad_checkpointing`` as given, or every block when it is open too), then the least checkpointing
    that fits at that batch. ``budget_bytes`` None: the CUDA device's total memory. Raises MemoryPlanError
    when nothing fits; with both given it only predicts (see ``Plan.fits``)."""
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    budget = int(budget_bytes) if budget_bytes is not None else device_total_memory()
    limit = int(budget * (1 - headroom))
    tracer = tracer or StepTracer(model_name, img_size, precision, **tracer_kwargs)
    choices = checkpointing_choices(*tracer.depths)
    traces_before = len(tracer._cache)

    if batch is None:
        k = grad_checkpointing if grad_checkpointing is not None else 1
        batch = _largest_fitting(lambda b: tracer.predict(b, k).peak_bytes <= limit,
                                 lambda b: tracer.predict(b, k).peak_bytes, limit, max_batch)
        if batch == 0:
            raise MemoryPlanError(
                f"nothing fits {fmt_bytes(budget)} less {headroom:.0%} headroom: {tracer.predict(1, k).describe()}"
                f"; try a smaller --img-size, another --precision, or a bigger --memory-budget")
    if grad_checkpointing is None:
        # least checkpointing that fits: the peak falls along ``choices``; find the first that fits
        lo, hi = 0, len(choices) - 1
        if tracer.predict(batch, choices[hi]).peak_bytes > limit:
            raise MemoryPlanError(f"batch {batch} does not fit {fmt_bytes(budget)} less {headroom:.0%} headroom "
                                  f"even with every block checkpointed: {tracer.predict(batch, 1).describe()}; "
                                  f"try --batch-size auto")
        while lo < hi:
            mid = (lo + hi) // 2
            if tracer.predict(batch, choices[mid]).peak_bytes <= limit:
                hi = mid
            else:
                lo = mid + 1
        grad_checkpointing = choices[lo]
    pred = tracer.predict(batch, grad_checkpointing)
    return Plan(batch, grad_checkpointing, pred.peak_bytes, budget, headroom, pred,
                traces=len(tracer._cache) - traces_before)


# ----------------------------------------------------------------------------- out of memory
def oom_message(plan_or_prediction: Union[Plan, MemoryPrediction], budget_bytes: Optional[int] = None) -> str:
    """One line for a CUDA out-of-memory error: what was predicted, against what, and what to try."""
    if isinstance(plan_or_prediction, Plan):
        pred, budget = plan_or_prediction.prediction, budget_bytes or plan_or_prediction.budget_bytes
    else:
        pred, budget = plan_or_prediction, budget_bytes
    if budget is None and torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    against = f" on a {fmt_bytes(budget)} device" if budget else ""
    tries = []
    if pred.grad_checkpointing != 1:
        tries.append("--grad-checkpointing 1" if not pred.grad_checkpointing else
                     "--grad-checkpointing 1 (every block)")
    tries.append("--batch-size auto")
    if pred.precision in ("fp32", "fp64"):
        tries.append("--precision bf16")
    plan_cmd = (f"mae-profile --memory --model {pred.model} --img-size {pred.img_size} --precision {pred.precision} "
                f"--batch-size auto --grad-checkpointing auto"
                + (f" --memory-budget {budget / GiB:.0f}" if budget else ""))
    return (f"out of memory{against}: {pred.describe()}; try {', '.join(tries)} (plan: {plan_cmd})")

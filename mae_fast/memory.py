"""Peak memory of one MAE training step, predicted before the run: the real step (the model of a
``ModelSpec``, built by ``mae_fast.model_spec.build_model``, forward under autocast, then the caller's own step
runner: mae-pretrain's ``StepRunner`` backward and fused AdamW) is run on fake tensors (``FakeTensorMode``:
shapes and dtypes, no data, no compute), and a dispatch-level tracker adds up the bytes of the tensor storages
alive after every op, by category. Seconds even for ViT-H/14 at 448 px and batch 256. The step runner comes
from the caller (``StepFactory``): this package never imports ``mae_fast.train``.

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
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Tuple, Union

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .device import PRECISION_DTYPES, autocast_for
from .errors import MemoryPlanError
from .model_spec import ModelSpec, build_model
from .models_mae import MaskedAutoencoderViT

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

    def settle(self, category: str) -> None:
        """Move every live storage but the parameters to ``category``: what outlived a step lives between steps."""
        for entry in self._live.values():
            if entry[1] not in ("parameters", category):
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
    activation_dtype: str
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
        residual = f", {self.activation_dtype} residual stream" if self.activation_dtype != "fp32" else ""
        parts = ", ".join(f"{name} {fmt_bytes(b[c])}" for name, c in (
            ("parameters", "parameters"), ("gradients", "gradients"), ("optimizer", "optimizer_state"),
            ("inputs", "inputs"), ("activations", "activations")))
        return (f"{self.model} @ {self.img_size}px, batch {self.batch_size}, {self.precision}{residual}, grad "
                f"checkpointing {ckpt}: predicted peak {fmt_bytes(self.peak_bytes)} (in {self.peak_phase}; {parts})")


class TrainingStep(Protocol):
    """What the trace calls after the forward: the public interface of mae-pretrain's step runner
    (``mae_fast.train.engine.loop.StepRunner``)."""

    def backward(self, loss: torch.Tensor, micro: int, images: int) -> None:
        """Backward of ``loss``, micro-step ``micro`` of ``images`` images."""

    def optimizer_step(self, step: int) -> None:
        """Step the optimizer, zero the gradients."""


#: the caller's optimizer and step runner for a model on a device: the run's own, passed in (mae_fast never
#: imports the training code)
StepFactory = Callable[[nn.Module, torch.device], TrainingStep]


def traced_spec(spec: ModelSpec, emulated: bool) -> ModelSpec:
    """``spec`` as the trace runs it: math attention, or SDPA for the fused kernels (those ``auto`` picks from
    keep what SDPA keeps: the output and the log-sum-exp); the kernels' PyTorch references where fake CPU
    tensors stand in for CUDA (``emulated``)."""
    return replace(spec, attn_backend="math" if spec.attn_backend == "math" else "sdpa",
                   kernel_backend="torch" if emulated else spec.kernel_backend)


class StepTracer:
    """The model of ``spec`` and the caller's step (``make_step``), built once on fake tensors with the state a
    run keeps between steps allocated, so that many (batch, checkpointing) pairs can be traced in a row
    (``plan_batch``); each trace names its batch and checkpointing (``spec``'s are ``predict_memory``'s).
    ``fake=False`` traces real tensors instead (to check the fake trace against)."""

    def __init__(self, spec: ModelSpec, make_step: StepFactory, device_type: str = "cuda",
                 trace_device: Optional[str] = None, fake: bool = True):
        if spec.precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {list(PRECISION_DTYPES)}, got {spec.precision!r}")
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
        if trace_device is None:
            trace_device = "cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu"
        self.spec = traced_spec(spec, emulated=trace_device != device_type)
        self.device_type, self.trace_device = device_type, trace_device
        self.device, self.fake = torch.device(trace_device), fake
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        self.tracker = LiveStorageTracker(CUDA_BLOCK if device_type == "cuda" else 1)
        with self.fake_mode:
            self.model: MaskedAutoencoderViT = build_model(self.spec, self.device, draw_on_device=True,
                                                           self_test=False)
            self.model.train()
            self.step = self._start(make_step)
        self._cache: Dict[Tuple[int, int], MemoryPrediction] = {}

    def _start(self, make_step: StepFactory) -> TrainingStep:
        """The caller's step for the model, and what a run keeps between steps (AdamW's state, the GradScaler's
        scale, the runner's counters), allocated by one step of it on a zero loss over every trainable
        parameter: all of it counted, whatever the caller's step holds."""
        for p in self.model.parameters():
            self.tracker.add(p, "parameters")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with self.tracker:
            step = make_step(self.model, self.device)
            step.backward(sum(p.sum() for p in trainable) * 0.0, 0, 0)
            step.optimizer_step(0)
        self.tracker.settle("optimizer_state")
        return step

    @property
    def depths(self) -> Tuple[int, int]:
        return len(self.model.blocks), len(self.model.decoder_blocks)

    @property
    def traces(self) -> int:
        """How many (batch, checkpointing) pairs were traced so far."""
        return len(self._cache)

    def assumptions(self) -> List[str]:
        out = ["steady state: AdamW state allocated (as from the second step on); one input batch on the device",
               "eager step (no torch.compile); one process (no DDP buckets / FSDP sharding)",
               "kernel-internal workspaces (cuBLAS, flash-attention backward) are not seen"]
        if self.trace_device != self.device_type:
            out += [f"traced on fake {self.trace_device} tensors standing in for {self.device_type}: CPU autocast "
                    f"gives this model the same dtypes as CUDA autocast (the CUDA fp32-list ops it reaches, "
                    f"layer_norm / pow / sum, already get float32 inputs)",
                    f"attention {self.spec.attn_backend}: the CPU fused SDPA kernel keeps, like CUDA flash / "
                    f"memory-efficient attention, only the output and the log-sum-exp per head",
                    f"kernel_backend {self.spec.kernel_backend!r}: the PyTorch references keep slightly more than "
                    f"the Triton ops (about 1-2% of the peak), so the prediction errs high"]
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
        spec, tracker = self.spec, self.tracker
        self.model.set_grad_checkpointing(grad_checkpointing)
        c = self.model.config
        with self.fake_mode:
            imgs = torch.zeros(batch_size, c.in_chans, c.img_size, c.img_size, device=self.device,
                               dtype=spec.weight_dtype or torch.float32)
            tracker.add(imgs, "inputs")
            tracker.reset_peak()
            self._run_step(imgs)
            del imgs
        pred = MemoryPrediction(
            model=spec.model, img_size=spec.img_size, batch_size=batch_size, precision=spec.precision,
            grad_checkpointing=grad_checkpointing, mask_ratio=spec.mask_ratio, device_type=self.device_type,
            traced_on=f"{'fake ' if self.fake else ''}{self.trace_device} tensors",
            kernel_backend=spec.kernel_backend, attn_backend=spec.attn_backend,
            activation_dtype=spec.activation_dtype, peak_bytes=tracker.peak, peak_phase=tracker.peak_phase,
            breakdown=dict(tracker.peak_breakdown), phase_peaks=dict(tracker.phase_peaks),
            between_steps_bytes=tracker.total, assumptions=self.assumptions())
        tracker.settle("optimizer_state")  # what the step leaves behind lives on to the next one
        return pred

    def _run_step(self, imgs: torch.Tensor) -> None:
        """One training step on ``imgs`` under the tracker, as mae-pretrain runs it: forward under autocast, then
        the caller's ``backward`` and ``optimizer_step``; gradients counted as such once accumulated."""
        tracker = self.tracker
        with tracker, gradients_tagged(tracker, self.model):
            tracker.category = "activations"
            tracker.set_phase("forward")
            with autocast_for(self.spec.precision, self.device):
                loss, _, _ = self.model(imgs, mask_ratio=self.spec.mask_ratio)
            tracker.set_phase("backward")
            self.step.backward(loss, 0, imgs.shape[0])
            del loss
            tracker.set_phase("optimizer")
            tracker.category = "optimizer_state"
            self.step.optimizer_step(0)


def predict_memory(spec: ModelSpec, make_step: StepFactory, device_type: str = "cuda") -> MemoryPrediction:
    """Predicted peak memory of one training step of ``spec`` at its batch and checkpointing (see the module doc)."""
    return StepTracer(spec, make_step, device_type).predict(spec.batch_size, spec.grad_checkpointing)


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


def plan_batch(tracer: StepTracer, budget_bytes: Optional[int] = None, batch: Optional[int] = None,
               grad_checkpointing: Optional[int] = None, headroom: float = 0.10, max_batch: int = 8192) -> Plan:
    """For the spec and step of ``tracer``, choose what ``None`` leaves open: the largest ``batch`` that fits
    ``budget_bytes`` less ``headroom`` (with ``grad_checkpointing`` as given, or every block when it is open
    too), then the least checkpointing that fits at that batch. ``budget_bytes`` None: the CUDA device's total
    memory. Raises MemoryPlanError when nothing fits; with both given it only predicts (see ``Plan.fits``)."""
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    budget = int(budget_bytes) if budget_bytes is not None else device_total_memory()
    limit = int(budget * (1 - headroom))
    choices = checkpointing_choices(*tracer.depths)
    traces_before = tracer.traces

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
                traces=tracer.traces - traces_before)


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
    residual = f" --activation-dtype {pred.activation_dtype}" if pred.activation_dtype != "fp32" else ""
    plan_cmd = (f"mae-profile --memory --model {pred.model} --img-size {pred.img_size} --precision {pred.precision}"
                f"{residual} --batch-size auto --grad-checkpointing auto"
                + (f" --memory-budget {budget / GiB:.0f}" if budget else ""))
    return (f"out of memory{against}: {pred.describe()}; try {', '.join(tries)} (plan: {plan_cmd})")

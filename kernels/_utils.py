"""Small helpers shared by the Triton ops: backend choice, interpreter detection, NaN poisoning."""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Sequence, Tuple

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    HAS_TRITON = False

    class _TritonStub:
        """Lets the kernel modules import (``@triton.jit``, ``tl.constexpr``) without Triton."""

        constexpr = object

        @staticmethod
        def jit(fn=None, **_kw):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, (int(n) - 1).bit_length())

    triton = tl = _TritonStub()  # type: ignore[assignment]



def _mend_interpreter_index() -> None:
    """Triton < 3.7's interpreter turns a scalar (a 1-element array) into an int with ``int(array)``, which
    NumPy >= 2.5 refuses ("only 0-dimensional arrays can be converted"): a ``range`` over a program id
    then fails. Take the scalar out first, as Triton 3.7+ does. Interpreter only; compiled kernels never
    reach this code."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_mae_mended", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._mae_mended = True
    interpreter._patch_lang_tensor = patched


if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _mend_interpreter_index()

#: ``backend=`` / ``--kernel-backend`` values: auto (Triton on CUDA, the PyTorch reference elsewhere) | triton | torch
KERNEL_BACKENDS = ("auto", "triton", "torch")
POISON_ENV = "MAE_FAST_KERNELS_POISON"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(backend: str, tensors: Sequence[torch.Tensor], op: str) -> bool:
    """Resolve ``backend`` ("auto" | "triton" | "torch") for tensors on one device."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{op}: backend='triton' got tensors on {devices}; Triton runs on CUDA tensors, or on CPU "
            "tensors only under the interpreter (set TRITON_INTERPRET=1 before triton is imported)"
        )
    return True


def autocast_dtype(device_type: str) -> "torch.dtype | None":
    """The active autocast dtype for ``device_type``, or None (also for devices autocast does not
    know, such as meta)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:
        return None


def new_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor when ``MAE_FAST_KERNELS_POISON=1`` (tests: catches
    any element a kernel forgets to write)."""
    if os.environ.get(POISON_ENV) == "1":
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def patchify_reference(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C): patches row-major, (py, px, c) inside a patch (official)."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


class Masking(NamedTuple):
    """The index tensors of one random masking: (N, L) ids_shuffle and ids_restore, (N, len_keep) ids_keep
    (a view of ids_shuffle), (N, L) float32 mask in patch order, 1 = removed."""

    ids_shuffle: torch.Tensor
    ids_restore: torch.Tensor
    ids_keep: torch.Tensor
    mask: torch.Tensor


def masking_reference(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """The official ``random_masking`` on ``noise`` (N, L), op for op: argsort (small noise = kept), keep
    ``int(L * (1 - mask_ratio))``, mask of ones zeroed at the kept places and gathered to patch order."""
    N, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones([N, L], device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return Masking(ids_shuffle, ids_restore, ids_keep, mask)


def check_patch_grid(imgs: torch.Tensor, p: int, op: str) -> tuple:
    """Validate (N, C, H, W) with H, W multiples of p; returns (N, C, H, W, grid_h, grid_w)."""
    if imgs.dim() != 4:
        raise ValueError(f"{op}: imgs must be (N, C, H, W), got shape {tuple(imgs.shape)}")
    N, C, H, W = imgs.shape
    if p <= 0 or H % p or W % p:
        raise ValueError(f"{op}: image size {H}x{W} is not a multiple of the patch size {p}")
    return N, C, H, W, H // p, W // p


# ----------------------------------------------------------------------------- per-shape choice
log = logging.getLogger("mae_fast.kernels")
_CHOICES: Dict[str, Dict[str, str]] = {}


def backend_choices() -> Dict[str, Dict[str, str]]:
    """{op: {shape: implementation}} chosen so far by timing (for logs and benchmark records)."""
    return {op: dict(shapes) for op, shapes in _CHOICES.items()}


def restore_backend_choices(choices: Dict[str, Dict[str, str]]) -> None:
    """Adopt choices made earlier (a resumed run's checkpoint, ``backend_choices()`` when it was saved): the
    same shapes then run the same implementation, not a new timing's winner, whose rounding differs."""
    for op, shapes in (choices or {}).items():
        _CHOICES.setdefault(op, {}).update(shapes)


def _median_ms(fn: Callable[[], Any], reps: int = 5) -> float:
    fn()  # warm-up: builds the kernels, allocates
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def choose_by_timing(op: str, key: str, candidates: Dict[str, Callable[[], torch.Tensor]],
                     device: torch.device) -> torch.Tensor:
    """Run the fastest of ``candidates`` (equal results up to float rounding) and return its output.

    On CUDA each candidate is timed once per ``key`` (CUDA events, median of 5 after a warm-up), the
    choice is cached and logged; elsewhere, and while a CUDA graph is being captured, nothing is timed
    and the first candidate runs (then nothing is cached either)."""
    chosen = _CHOICES.get(op, {}).get(key)
    if chosen is None:
        first = next(iter(candidates))
        if torch.device(device).type != "cuda" or torch.cuda.is_current_stream_capturing():
            return candidates[first]()
        times = {name: _median_ms(fn) for name, fn in candidates.items()}
        chosen = min(times, key=times.get)
        _CHOICES.setdefault(op, {})[key] = chosen
        log.info("%s %s: using %s (%s)", op, key, chosen, ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()))
    return candidates[chosen]()


# ----------------------------------------------------------------------------- launches
class Launch(NamedTuple):
    """One kernel launch: the kernel, its grid, every argument by name (tensors, ints, constexprs)
    and the compile options (num_warps, num_stages)."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Dict[str, Any]
    options: Dict[str, int]
    compiled: Any = None  # the runtime's CompiledKernel, when the launch ran on a GPU

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


_RECORDERS: List[Tuple[List[Launch], bool]] = []


@contextlib.contextmanager
def recording_launches(execute: bool = True) -> Iterator[List[Launch]]:
    """Collect every kernel launch of the ops in a list; with ``execute=False`` nothing runs (the
    ops' launch code can then be driven with meta tensors, e.g. to build kernels ahead of time)."""
    record: List[Launch] = []
    _RECORDERS.append((record, execute))
    try:
        yield record
    finally:
        _RECORDERS.pop()


def launch(kernel, grid: Tuple[int, ...], args: Dict[str, Any], options: Dict[str, int]) -> None:
    """Launch ``kernel[grid](**args, **options)`` (the only place the ops launch from), or record it."""
    if _RECORDERS:
        record, execute = _RECORDERS[-1]
        compiled = kernel[tuple(grid)](**args, **options) if execute else None
        record.append(Launch(kernel, tuple(grid), dict(args), dict(options), compiled))
        return
    kernel[tuple(grid)](**args, **options)


_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}


def arg_specialization(value: Any) -> Tuple[str, Any]:
    """(Triton type, specialization) that the JIT runtime gives a non-constexpr argument: pointers and
    ints get "D" when divisible by 16 (the tt.divisibility=16 hint), the int 1 and None become
    constexprs, floats and bools are not specialized (tested against triton's own rule)."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPES[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no Triton specialization rule for an argument of type {type(value).__name__}")


def constexpr_params(kernel) -> List[str]:
    """Names of a ``@triton.jit`` kernel's ``tl.constexpr`` parameters (compiled or interpreted)."""
    params = inspect.signature(kernel.fn).parameters.values()
    return [p.name for p in params
            if p.annotation is tl.constexpr or (isinstance(p.annotation, str) and p.annotation.endswith("constexpr"))]


def launch_signature(lc: Launch) -> Dict[str, Tuple[str, Any]]:
    """Every argument of a launch as (Triton type or "constexpr", specialization or constexpr value)."""
    constexprs = set(constexpr_params(lc.kernel))
    return {name: ("constexpr", value) if name in constexprs else arg_specialization(value)
            for name, value in lc.args.items()}


def compile_launch(lc: Launch, arch: int = 90):
    """Compile a recorded launch ahead of time to a CUDA binary (no GPU needed) exactly as the JIT
    runtime would for those arguments: same types, constexprs and divisibility-by-16 hints."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("compile_launch cannot run under TRITON_INTERPRET=1")
    names = lc.kernel.arg_names
    missing = [a for a in names if a not in lc.args]
    if missing:
        raise ValueError(f"{lc.name}: launch lacks arguments {missing}")
    spec = launch_signature(lc)
    signature = {a: spec[a][0] for a in names}
    constexprs = {(names.index(a),): spec[a][1] for a in names if spec[a][0] == "constexpr"}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in names if spec[a][1] == "D"}
    src = ASTSource(fn=lc.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(lc.options))

"""Attention backends behind one function: the seam where faster kernels plug in.

Every backend takes the fused qkv projection reshaped to (B, N, 3, heads, head_dim) and
returns (B, N, heads, head_dim), so a backend that wants the BMHK layout (xformers) needs
no transposes and one that wants BHNK (SDPA) does its own.

Backends: ``sdpa`` (PyTorch picks its kernel), ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient``
(one SDPA kernel forced with ``torch.nn.attention.sdpa_kernel``), ``math`` (the official explicit
softmax) and ``xformers``. ``auto`` times the fused ones forward + backward at one attention site's
real shape (:func:`pick_attention_backend`), so the encoder (1 + visible tokens) and the decoder
(1 + L tokens) may each get their own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .device import is_main_process

AttentionFn = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)


def sdpa_attention(qkv: torch.Tensor) -> torch.Tensor:
    """PyTorch ``scaled_dot_product_attention``, PyTorch choosing flash / cuDNN / efficient / math."""
    q, k, v = qkv.transpose(1, 3).unbind(2)  # each (B, heads, N, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def forced_sdpa(backend: SDPBackend) -> AttentionFn:
    """SDPA restricted to one kernel (an error, not a silent fallback, where it cannot run)."""

    def attend(qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.transpose(1, 3).unbind(2)
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)

    attend.__name__ = attend.__qualname__ = f"sdpa_{backend.name.lower()}"
    attend.__doc__ = f"scaled_dot_product_attention with only SDPBackend.{backend.name} enabled."
    return attend


def math_attention(qkv: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in matmuls, in the official code's (timm's) order: the scale applied
    to the (N, N) scores. The readable reference and the official-equivalent baseline."""
    q, k, v = qkv.transpose(1, 3).unbind(2)
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2)


def xformers_attention(qkv: torch.Tensor) -> torch.Tensor:
    """xformers ``memory_efficient_attention`` on BMHK views of the fused qkv: no transposes."""
    import xformers.ops as xops

    q, k, v = qkv.unbind(2)  # each (B, N, heads, head_dim)
    return xops.memory_efficient_attention(q, k, v)


ATTENTION_BACKENDS: Dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "sdpa_flash": forced_sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": forced_sdpa(SDPBackend.CUDNN_ATTENTION),
    "sdpa_efficient": forced_sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "math": math_attention,
    "xformers": xformers_attention,
}
BACKEND_NAMES = ("auto", *ATTENTION_BACKENDS)
#: what ``auto`` times on CUDA, in this order (xformers only when installed)
AUTO_CANDIDATES = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "xformers")


def get_attention(backend: str) -> AttentionFn:
    """Look up a concrete attention backend by name; unknown names list the known ones."""
    try:
        return ATTENTION_BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown attn_backend {backend!r}; choose one of {list(BACKEND_NAMES)}"
        ) from None


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class AttentionSite:
    """One attention call's shape: the qkv tensor is (batch, tokens, 3, heads, head_dim)."""

    batch: int
    tokens: int
    heads: int
    head_dim: int

    def describe(self) -> str:
        return f"batch {self.batch}, {self.tokens} tokens, {self.heads} heads of {self.head_dim}"


@dataclass
class AttentionChoice:
    """What ``auto`` chose for a site and why: per-candidate fwd+bwd milliseconds, or why it was out."""

    backend: str
    site: AttentionSite
    dtype: str
    device: str
    timings_ms: Dict[str, float] = field(default_factory=dict)
    rejected: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict:
        return {"backend": self.backend, "tokens": self.site.tokens, "heads": self.site.heads,
                "head_dim": self.site.head_dim, "batch": self.site.batch, "dtype": self.dtype,
                "device": self.device, "timings_ms": dict(self.timings_ms), "rejected": dict(self.rejected)}


_AUTO_CHOICE: Dict[tuple, AttentionChoice] = {}


def _time_fwd_bwd(fn: AttentionFn, qkv: torch.Tensor, iters: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of forward + backward of ``fn`` on ``qkv`` (CUDA events, no host sync inside)."""
    x = qkv.detach().requires_grad_(True)
    grad = torch.randn_like(fn(x))
    events = []
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x).backward(grad)
        end.record()
        x.grad = None
        if i >= warmup:
            events.append((start, end))
    torch.cuda.synchronize(qkv.device)
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def _relative_error(fn: AttentionFn, qkv: torch.Tensor) -> float:
    """‖fn(qkv) − math(qkv in float32)‖ / ‖math‖ on the first two samples (catches a wrong kernel)."""
    small = qkv[:2].detach()
    got = fn(small).float()
    ref = math_attention(small.float())
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


#: short names of the dtypes ``auto`` times in, for its log line
_DTYPE_WORDS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def describe_choice(choice: AttentionChoice, site_name: Optional[str] = None) -> str:
    """``auto``'s choice for one site in words: the shape, dtype and device, the backend, and why (the timings,
    the candidates rejected and their reasons, or that a CPU times nothing)."""
    where = f" for the {site_name}" if site_name else ""
    s = choice.site
    shape = f"batch {s.batch} x {s.tokens} tokens x {s.heads} heads x {s.head_dim} dims"
    dtype = _DTYPE_WORDS.get(choice.dtype, choice.dtype)
    if not choice.device.startswith("cuda"):
        why = "no CUDA device, nothing timed"
    else:
        timed = ", ".join(f"{n} {t:.3f} ms" for n, t in choice.timings_ms.items())
        parts = [f"forward + backward timed: {timed}" if timed else "no candidate ran, plain sdpa"]
        if choice.rejected:
            parts.append("not usable: " + ", ".join(f"{n} ({r})" for n, r in choice.rejected.items()))
        why = "; ".join(parts)
    return f"attention (auto){where}, {shape}, {dtype} on {choice.device}: {choice.backend} ({why})"


def pick_attention_backend(device: torch.device, dtype: torch.dtype, site: AttentionSite,
                           candidates: Optional[Sequence[str]] = None,
                           site_name: Optional[str] = None) -> AttentionChoice:
    """The fastest backend whose forward + backward runs, and agrees with ``math``, at ``site``.

    CPU: plain ``sdpa``, nothing timed. CUDA: each candidate (default :data:`AUTO_CANDIDATES`,
    xformers only when installed) is timed on random inputs of the site's shape; the choice is cached
    per (device, dtype, shape) and logged once, by the main process only (``site_name``, e.g. "encoder",
    names the site in that line).
    """
    device = torch.device(device)
    key = (str(device), torch.cuda.get_device_name(device) if device.type == "cuda" else "", dtype, site)
    if key in _AUTO_CHOICE:
        return _AUTO_CHOICE[key]
    dname = str(dtype).replace("torch.", "")
    if device.type != "cuda":
        choice = AttentionChoice("sdpa", site, dname, str(device), rejected={"*": "no CUDA device: nothing timed"})
    else:
        choice = AttentionChoice("sdpa", site, dname, str(device))  # if no candidate runs
        names = [n for n in (candidates or AUTO_CANDIDATES) if n != "xformers" or xformers_available()]
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(site.batch, site.tokens, 3, site.heads, site.head_dim, device=device, dtype=dtype,
                          generator=g)
        tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
        for name in names:
            fn = ATTENTION_BACKENDS[name]
            try:
                err = _relative_error(fn, qkv)
                if not err <= tol:  # NaN too
                    choice.rejected[name] = f"relative error {err:.3g} vs math > {tol}"
                    continue
                choice.timings_ms[name] = _time_fwd_bwd(fn, qkv)
            except Exception as e:  # a backend that cannot run this shape is no candidate
                msg = str(e).strip().splitlines()
                choice.rejected[name] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]
        del qkv
        if choice.timings_ms:
            choice.backend = min(choice.timings_ms, key=choice.timings_ms.get)
    _AUTO_CHOICE[key] = choice
    if is_main_process():
        log.info("%s", describe_choice(choice, site_name))
    return choice

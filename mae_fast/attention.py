"""Attention backends behind one function: the seam where faster kernels plug in.

Every backend takes the fused qkv projection reshaped to (B, N, 3, heads, head_dim) and
returns (B, N, heads, head_dim), so a backend that wants the BMHK layout (xformers) needs
no transposes and one that wants BHNK (SDPA) does its own.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor], torch.Tensor]


def sdpa_attention(qkv: torch.Tensor) -> torch.Tensor:
    """PyTorch ``scaled_dot_product_attention`` (flash / cuDNN / efficient / math, chosen by torch)."""
    q, k, v = qkv.transpose(1, 3).unbind(2)  # each (B, heads, N, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def math_attention(qkv: torch.Tensor) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v in matmuls: the readable reference, as the official code."""
    q, k, v = qkv.transpose(1, 3).unbind(2)
    scale = q.shape[-1] ** -0.5
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2)


def xformers_attention(qkv: torch.Tensor) -> torch.Tensor:
    """xformers ``memory_efficient_attention`` on BMHK views of the fused qkv: no transposes."""
    import xformers.ops as xops

    q, k, v = qkv.unbind(2)  # each (B, N, heads, head_dim)
    return xops.memory_efficient_attention(q, k, v)


ATTENTION_BACKENDS: Dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "math": math_attention,
    "xformers": xformers_attention,
}
BACKEND_NAMES = ("auto", *ATTENTION_BACKENDS)

log = logging.getLogger(__name__)
_AUTO_CHOICE: Dict[tuple, str] = {}


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


def _time_backend(fn: AttentionFn, qkv: torch.Tensor, iters: int = 10) -> float:
    """Median seconds of forward+backward of ``fn`` on ``qkv`` (CUDA events)."""
    times = []
    for i in range(iters + 3):
        x = qkv.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x).sum().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def pick_attention_backend(device: torch.device, dtype: torch.dtype, head_dims: Iterable[int],
                           tokens: int = 256, batch: int = 32, heads: int = 16) -> str:
    """The fastest backend that runs forward and backward for every head size, on this device.

    CPU (xformers has no CPU kernels) → "sdpa". On CUDA, "sdpa" and, when installed, "xformers" are
    timed on (batch, tokens) for each head size; the choice is logged once per (device, dtype, heads).
    """
    device = torch.device(device)
    head_dims = tuple(sorted(set(head_dims)))
    key = (str(device), dtype, head_dims)
    if key in _AUTO_CHOICE:
        return _AUTO_CHOICE[key]
    if device.type != "cuda":
        choice, why = "sdpa", "no CUDA device (xformers has no CPU kernels)"
    else:
        candidates = ["sdpa"] + (["xformers"] if xformers_available() else [])
        totals: Dict[str, float] = {}
        for name in candidates:
            try:
                totals[name] = sum(
                    _time_backend(ATTENTION_BACKENDS[name],
                                  torch.randn(batch, tokens, 3, heads, d, device=device, dtype=dtype))
                    for d in head_dims)
            except Exception as e:  # a backend that cannot run these shapes is not a candidate
                log.info("attention backend %s unavailable for head dims %s: %s", name, head_dims, e)
        choice = min(totals, key=totals.get) if totals else "math"
        why = ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in totals.items()) or "no fused backend ran"
    _AUTO_CHOICE[key] = choice
    log.info("attn_backend auto: using %s on %s %s for head dims %s (%s)",
                choice, device, str(dtype).replace("torch.", ""), list(head_dims), why)
    return choice

"""Benchmark of the three MAE Triton ops against their eager and torch.compile'd PyTorch references.

    python -m mae_fast.bench.bench_kernels                          # every case
    python -m mae_fast.bench.bench_kernels --impls eager,triton,triton_fused,triton_gemm   # the GPU suite's

For each op (patch_embed_gather, unshuffle_mask_tokens, masked_loss), pass (fwd, fwd+bwd), shape
(ViT-L/16 @ 224 batch 256, ViT-H/14 @ 448 batch 64) and implementation (eager reference,
torch.compile(reference), Triton as the model runs it; for patch_embed_gather also each of its two
Triton forwards, "triton_fused" and "triton_gemm" = Triton gather + cuBLAS), it reports the time per
call, the achieved GB/s counted on the minimum bytes the op must read and write, and that as a fraction
of a measured device-to-device copy bandwidth (patch_embed_gather also reports TFLOP/s: its GEMM is
2*N*K*P*D FLOPs).

Dtypes are those of bf16-autocast training: images float32, GEMM weights bf16 (as autocast casts
them), position tables / mask token float32, decoder tokens and predictions bf16.

On a machine without CUDA it runs the eager (and, with MAE_FAST_BENCH_CPU_COMPILE=1, the compiled)
reference at batch 2 and skips the Triton rows with the reason. The JSON record (device, date, git
commit, command, numbers, the rows skipped and why, and the forward each op chose by timing:
``mae_fast.kernels.backend_choices()``) is rewritten after every case, to bench/results/ on a GPU and
to $MAE_RESULTS_DIR; exit 1 when a case failed (the others still run).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mae_fast.kernels import (backend_choices, masked_loss, masked_loss_reference, patch_embed_gather,
                              patch_embed_gather_reference, unshuffle_mask_tokens, unshuffle_mask_tokens_reference)
from mae_fast.kernels._utils import masking_reference

from .records import record_header, utc_stamp, write_result

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# name: (batch on GPU, patch, grid, encoder width, decoder width)
SHAPES = {
    "vit_l16_224_b256": (256, 16, 14, 1024, 512),
    "vit_h14_448_b64": (64, 14, 32, 1280, 512),
}
CPU_BATCH = 2
MASK_RATIO = 0.75
OPS = ("patch_embed_gather", "unshuffle_mask_tokens", "masked_loss")
IMPLS = ("eager", "compiled", "triton", "triton_fused", "triton_gemm")
PASSES = ("fwd", "fwd_bwd")


# ----------------------------------------------------------------------------- measurement
def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _time_per_call(fn: Callable[[], object], min_time: float = 0.2) -> float:
    """Median seconds per call. CUDA: triton.testing.do_bench (CUDA events around each call, L2 flushed
    between calls, so inputs are read from HBM; a call costs max(launch overhead, GPU time)).
    CPU: wall clock over batches of calls."""
    if CUDA:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    one = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, min(200, int(0.02 / one)))
    samples = []
    deadline = time.perf_counter() + min_time
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 50):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync()
        samples.append((time.perf_counter() - t0) / inner)
    samples.sort()
    return samples[len(samples) // 2]


_COPY_BW: Dict[str, float] = {}


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write counted)."""
    if DEVICE not in _COPY_BW:
        nbytes = (1 << 30) if CUDA else (1 << 27)
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).fill_(1.0)
        dst = torch.empty_like(src)
        t = _time_per_call(lambda: dst.copy_(src))
        _COPY_BW[DEVICE] = 2 * nbytes / t
        del src, dst
    return _COPY_BW[DEVICE]


# ----------------------------------------------------------------------------- cases
def _isz(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()




def make_case(op: str, shape: str, pas: str):
    """Returns (run(impl) -> callable, bytes, flops) for one op / shape / pass."""
    N, p, grid, D, Dd = SHAPES[shape]
    if not CUDA:
        N = CPU_BATCH
    L, C = grid * grid, 3
    P = p * p * C
    bwd = pas == "fwd_bwd"
    g = torch.Generator().manual_seed(zlib.crc32(f"{op}/{shape}".encode()))
    masking = masking_reference(torch.rand(N, L, generator=torch.Generator().manual_seed(1)), MASK_RATIO)
    K = masking.ids_keep.shape[1]
    ids_restore, mask = masking.ids_restore.to(DEVICE), masking.mask.to(DEVICE)
    imgs = torch.randn(N, C, grid * p, grid * p, generator=g).to(DEVICE)
    bf16 = torch.bfloat16
    flops = 0

    if op == "patch_embed_gather":
        ids_keep = masking.ids_keep.contiguous().to(DEVICE)
        weight = (torch.randn(D, P, generator=g) * 0.02).to(DEVICE, bf16).requires_grad_(bwd)
        bias = torch.randn(D, generator=g).to(DEVICE, bf16).requires_grad_(bwd)
        pos = torch.randn(L, D, generator=g).to(DEVICE)
        args = (imgs, ids_keep, weight, bias, pos, p)
        leaves = (weight, bias)
        fns = {"eager": patch_embed_gather_reference,
               "triton": lambda *a: patch_embed_gather(*a, backend="triton"),
               "triton_fused": lambda *a: patch_embed_gather(*a, backend="triton", impl="fused"),
               "triton_gemm": lambda *a: patch_embed_gather(*a, backend="triton", impl="gemm")}
        M = N * K
        # visible pixels, ids, weight, bias, position table; the output is bf16 (the GEMM dtype)
        nbytes = M * P * 4 + M * 8 + D * P * 2 + D * 2 + L * D * 4 + M * D * 2
        flops = 2 * M * P * D
        if bwd:  # grad_out, visible pixels again, weight, ids; write grad_weight, grad_bias
            nbytes += M * D * 2 + M * P * 4 + M * 8 + D * P * 2 + D * P * 2 + D * 2
            flops *= 2  # + grad_weight GEMM (images need no grad)
    elif op == "unshuffle_mask_tokens":
        x = torch.randn(N, 1 + K, Dd, generator=g).to(DEVICE, bf16).requires_grad_(bwd)
        mask_token = torch.randn(1, 1, Dd, generator=g).to(DEVICE).requires_grad_(bwd)
        pos = torch.randn(1, 1 + L, Dd, generator=g).to(DEVICE)
        args = (x, mask_token, ids_restore, pos)
        leaves = (x, mask_token)
        fns = {"eager": unshuffle_mask_tokens_reference,
               "triton": lambda *a: unshuffle_mask_tokens(*a, backend="triton")}
        nbytes = N * (1 + K) * Dd * 2 + Dd * 4 + N * L * 8 + (1 + L) * Dd * 4 + N * (1 + L) * Dd * 4
        if bwd:  # read grad_out and ids, write grad_x and grad_mask_token
            nbytes += N * (1 + L) * Dd * 4 + N * L * 8 + N * (1 + K) * Dd * 2 + Dd * 4
    elif op == "masked_loss":
        pred = torch.randn(N, L, P, generator=g).to(DEVICE, bf16).requires_grad_(bwd)
        args = (pred, imgs, mask, p, True)
        leaves = (pred,)
        fns = {"eager": masked_loss_reference,
               "triton": lambda *a: masked_loss(*a, backend="triton")}
        Mm = N * (L - K)
        nbytes = Mm * P * 2 + Mm * P * 4 + N * L * 4  # masked pred rows, masked pixels, mask
        if bwd:  # read them again, write the full grad_pred (zeros included)
            nbytes += Mm * P * 2 + Mm * P * 4 + N * L * 4 + N * L * P * 2
    else:
        raise ValueError(op)

    def run(impl: str) -> Callable[[], object]:
        if impl == "compiled":
            fn = torch.compile(fns["eager"], dynamic=False)
        else:
            fn = fns[impl]
        if not bwd:
            def call():
                with torch.no_grad():
                    return fn(*args)
        else:
            def call():
                out = fn(*args)
                return torch.autograd.grad(out, leaves, torch.ones_like(out))
        return call

    return run, nbytes, flops



# ----------------------------------------------------------------------------- the benchmark
def has_impl(op: str, impl: str) -> bool:
    """Whether ``op`` has implementation ``impl`` (only patch_embed_gather has two Triton forwards)."""
    return not impl.startswith("triton_") or op == "patch_embed_gather"


def skip_reason(impl: str) -> Optional[str]:
    """Why ``impl`` is not timed on this machine, or None when it is."""
    if impl.startswith("triton") and not CUDA:
        return "Triton timing needs a CUDA GPU (the CPU interpreter checks correctness, it is not a speed)"
    if impl == "compiled" and not CUDA and os.environ.get("MAE_FAST_BENCH_CPU_COMPILE") != "1":
        return "torch.compile on CPU is slow to build and not the target; set MAE_FAST_BENCH_CPU_COMPILE=1"
    return None


def measure(op: str, shape: str, pas: str, impl: str) -> Dict[str, object]:
    """One record row: time per call (garbage collector off while timing), GB/s, share of copy bandwidth."""
    run, nbytes, flops = make_case(op, shape, pas)
    call = run(impl)
    gc.collect()
    gc.disable()
    try:
        seconds = _time_per_call(call)  # warms up (compiles) first
    finally:
        gc.enable()
    bw = copy_bandwidth()
    gbps = nbytes / seconds / 1e9
    row: Dict[str, object] = {
        "op": op, "shape": shape, "pass": pas, "impl": impl,
        "batch": SHAPES[shape][0] if CUDA else CPU_BATCH,
        "time_us": seconds * 1e6,
        "min_bytes": nbytes,
        "GBps": gbps,
        "fraction_of_copy_bw": gbps * 1e9 / bw,
    }
    if flops:
        row["TFLOPs"] = flops / seconds / 1e12
    return row


def format_row(row: Dict[str, object]) -> str:
    """One printed line: op, shape, pass, impl, time, GB/s (share of copy bandwidth), TFLOP/s."""
    line = (f"{row['op']:24s} {row['shape']:18s} {row['pass']:8s} {row['impl']:12s} {row['time_us']:10.1f} us "
            f"{row['GBps']:9.4g} GB/s ({row['fraction_of_copy_bw']:5.1%} of copy)")
    return line + (f" {row['TFLOPs']:.1f} TFLOP/s" if "TFLOPs" in row else "")


def new_record(command: str) -> Dict[str, object]:
    """The record's header and empty lists of rows, skipped cases and failed cases."""
    return {**record_header("bench_kernels", command=command), "copy_bandwidth_GBps": 0.0,
            "backend_choices": {}, "results": [], "skipped": [], "errors": []}


def run_cases(record: Dict[str, object], ops: Sequence[str], shapes: Sequence[str], passes: Sequence[str],
              impls: Sequence[str], save: Callable[[], None]) -> None:
    """Time every (op, shape, pass, impl) into ``record``, calling ``save`` after each case."""
    for op in ops:
        for shape in shapes:
            for pas in passes:
                for impl in (i for i in impls if has_impl(op, i)):
                    case = {"op": op, "shape": shape, "pass": pas, "impl": impl}
                    why = skip_reason(impl)
                    if why:
                        record["skipped"].append({**case, "reason": why})
                        continue
                    try:
                        row = measure(op, shape, pas, impl)
                    except Exception as e:  # one failing case does not stop the others
                        record["errors"].append({**case, "error": f"{type(e).__name__}: {e}"})
                        print(f"{op:24s} {shape:18s} {pas:8s} {impl:12s} FAILED: {type(e).__name__}: {e}")
                    else:
                        record["results"].append(row)
                        print(format_row(row))
                    record["copy_bandwidth_GBps"] = _COPY_BW.get(DEVICE, 0.0) / 1e9
                    record["backend_choices"] = backend_choices()
                    save()


def _names(allowed: Sequence[str]) -> Callable[[str], List[str]]:
    """An argparse type: a non-empty comma list of names from ``allowed``."""
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; choose from {list(allowed)}")
        return names
    return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Comma lists of ops, shapes, passes and implementations (default: all of each)."""
    p = argparse.ArgumentParser(prog="python -m mae_fast.bench.bench_kernels", description=__doc__.split("\n")[0])
    for flag, allowed in (("--ops", OPS), ("--shapes", tuple(SHAPES)), ("--passes", PASSES), ("--impls", IMPLS)):
        p.add_argument(flag, type=_names(allowed), default=list(allowed),
                       help=f"comma list of {', '.join(allowed)} (default: all)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the chosen cases, print one line each and keep the record up to date; 1 if a case failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    record = new_record(" ".join([Path(sys.executable).name, "-m", "mae_fast.bench.bench_kernels", *argv]))
    stamp, written = utc_stamp(), []

    def save() -> None:
        written[:] = [write_result("kernels", record, stamp=stamp)]

    run_cases(record, args.ops, args.shapes, args.passes, args.impls, save)
    save()  # the skipped cases after the last measured one, or a run with nothing to measure
    reasons = Counter(s["reason"] for s in record["skipped"])
    for why, count in reasons.items():
        print(f"skipped {count} case(s): {why}")
    path = written[0] if written else None
    print(f"wrote {path}" if path else "no record written (a CPU run goes only to $MAE_RESULTS_DIR)")
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU-suite preflight: versions, the GPU and its clocks, and the Triton kernel self-test at the widths the
suite benchmarks, in one record; exit 2 when a CUDA GPU is required and absent, 1 when a kernel fails.

    python -m mae_fast.bench.preflight --require-cuda      # first step of bench/gpu_suite.sh
    TRITON_INTERPRET=1 python -m mae_fast.bench.preflight --tiny   # the dry run: CPU, interpreter
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

from .records import record_header, write_result

#: (patch size, encoder width, decoder width) of the models the suite benchmarks
SHAPES: Dict[str, Tuple[int, int, int]] = {"vit_l16": (16, 1024, 512), "vit_h14": (14, 1280, 512)}
TINY: Dict[str, Tuple[int, int, int]] = {"vit_tiny_p8": (8, 96, 64)}


def kernel_selftests(device: torch.device, shapes: Dict[str, Tuple[int, int, int]]) -> Dict[str, Dict]:
    """{shape: {op: None | why it failed}}; on a CPU only under TRITON_INTERPRET=1 (else {} and why)."""
    from mae_fast.kernels.selftest import selftest

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": {"*": "Triton kernels run on a CPU only under TRITON_INTERPRET=1"}}
    return {name: selftest(device, *shape) for name, shape in shapes.items()}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mae-preflight", description=__doc__.split("\n")[0])
    p.add_argument("--require-cuda", action="store_true", help="exit 2 unless a CUDA GPU is visible")
    p.add_argument("--tiny", action="store_true", help="self-test at the tiny model's widths (dry runs)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.require_cuda and not cuda:
        print("preflight: error: no CUDA device is visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    rec = record_header("preflight", device, "python -m mae_fast.bench.preflight " + " ".join(argv or sys.argv[1:]))
    gpu = rec.get("gpu", {})
    print(f"device {rec['device']}: torch {rec['torch']}, triton {rec['triton']}, CUDA {rec['cuda']}, "
          f"cuDNN {rec['cudnn']}, driver {rec.get('driver')}, xformers {rec['xformers']}")
    if gpu:
        print(f"  {gpu['sm_count']} SMs, {gpu['memory_gib']} GiB, capability {gpu['capability']}, clocks now: SM "
              f"{gpu.get('sm_mhz')} of {gpu.get('max_sm_mhz')} MHz, memory {gpu.get('mem_mhz')} of "
              f"{gpu.get('max_mem_mhz')} MHz, power limit {gpu.get('power_limit_w')} W")
    tests = kernel_selftests(device, TINY if args.tiny else SHAPES)
    failures = {f"{shape}/{op}": why for shape, ops in tests.items() if shape != "skipped"
                for op, why in ops.items() if why}
    for shape, ops in tests.items():
        print(f"  kernel self-test {shape}: " + ", ".join(f"{op} {'ok' if not why else 'FAILED: ' + why}"
                                                         for op, why in ops.items()))
    rec.update(kernel_selftest=tests, kernels_pass=not failures and "skipped" not in tests)
    path = write_result("preflight", rec)
    print(f"wrote {path}" if path else "no record written (a CPU run goes only to $MAE_RESULTS_DIR)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

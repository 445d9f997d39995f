"""``python -m mae_fast.bench.kernel_resources``: registers, spills and shared memory of every Triton
kernel of the three ops, as built for sm_90 (H100 / H200) at the headline shapes, without a GPU.

Each kernel is launched by the ops' own launch code on meta tensors laid out as the model passes them
under bf16 autocast (same dtypes, views and offsets, so the same divisibility-by-16 specialization of
pointers, strides and ints as the real launch; ints equal to 1 become constexprs, as at run time), and
compiled ahead of time with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``. The figures are
ptxas's own report for that build (``ptxas -v``, which Triton runs with ``TRITON_DUMP_PTXAS_LOG=1``):
registers per thread, stack frame and spill stores / loads in bytes per thread; shared memory is the
dynamic shared memory Triton allocates for the kernel (``compiled.metadata.shared``).

    python -m mae_fast.bench.kernel_resources            # table
    python -m mae_fast.bench.kernel_resources --json     # JSON rows
    python -m mae_fast.bench.kernel_resources --shapes vit_h14_448 --batch 64
    python -m mae_fast.bench.kernel_resources --dtype fp32   # a run without autocast (other tiles)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mae_fast.device import PRECISION_DTYPES
from mae_fast.kernels._utils import Launch, compile_launch, interpreting, launch_signature, recording_launches
from mae_fast.models_mae import MODEL_CONFIGS, MAEConfig

# the op modules (their names are shadowed by the functions mae_fast.kernels exports)
PE = importlib.import_module("mae_fast.kernels.patch_embed_gather")
LOSS = importlib.import_module("mae_fast.kernels.masked_loss")
UNSHUFFLE = importlib.import_module("mae_fast.kernels.unshuffle")

#: the headline shapes: (model, image size, batch), batches as mae-bench's presets
SHAPES: Dict[str, Tuple[str, int, int]] = {
    "vit_b16_224": ("mae_vit_base_patch16", 224, 256),
    "vit_l16_224": ("mae_vit_large_patch16", 224, 256),
    "vit_h14_224": ("mae_vit_huge_patch14", 224, 128),
    "vit_h14_448": ("mae_vit_huge_patch14", 448, 32),
}
MASK_RATIO = 0.75
DTYPE = torch.bfloat16  # the autocast dtype of training


def model_config(name: str, img_size: int) -> MAEConfig:
    return MAEConfig(**{**MODEL_CONFIGS[name], "img_size": img_size})


def model_launches(cfg: MAEConfig, batch: int, mask_ratio: float = MASK_RATIO, dtype: torch.dtype = DTYPE,
                   norm_pix_loss: bool = True, device: str = "meta") -> List[Tuple[str, bool, Launch]]:
    """(label, runs in pretraining, launch) for every kernel of one training step of ``cfg`` (norm-pix
    loss as the paper's recipe), built by the ops' launch code on tensors laid out as
    ``MaskedAutoencoderViT`` passes them under autocast."""
    N, p, C, D, Dd = batch, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.decoder_embed_dim
    L, P, H = cfg.num_patches, cfg.patch_dim, cfg.img_size
    K = int(L * (1 - mask_ratio))
    f32, i64 = torch.float32, torch.int64
    pd = dtype if dtype in (torch.float32, torch.float64) else f32  # parameters (and images): fp32 under autocast
    imgs = torch.empty(N, C, H, H, dtype=pd, device=device)
    ids_shuffle = torch.empty(N, L, dtype=i64, device=device)       # argsort(noise)
    ids_keep = ids_shuffle[:, :K]                                     # a view, as in masking_ids
    ids_restore = torch.empty(N, L, dtype=i64, device=device)
    mask = torch.empty(N, L, dtype=f32, device=device)
    # patch_embed_gather: weight_in_patch_order() cast by autocast; pos_embed[0, 1:] a view
    weight = torch.empty(D, C, p, p, dtype=pd, device=device).reshape(D, -1).to(dtype)
    bias = torch.empty(D, dtype=dtype, device=device)
    pos = torch.empty(1, 1 + L, D, dtype=pd, device=device)[0, 1:]
    # unshuffle: decoder_embed output (autocast dtype), float32 mask token and decoder positions
    x = torch.empty(N, 1 + K, Dd, dtype=dtype, device=device)
    mask_token = torch.empty(1, 1, Dd, dtype=pd, device=device)
    dec_pos = torch.empty(1, 1 + L, Dd, dtype=pd, device=device)
    out_dtype = torch.promote_types(dtype, pd)
    grad_dec = torch.empty(N, 1 + L, Dd, dtype=out_dtype, device=device)
    # loss: decoder_pred(x)[:, 1:, :], a view one row into the prediction tensor
    pred = torch.empty(N, 1 + L, P, dtype=dtype, device=device)[:, 1:, :]
    grad_loss = torch.empty((), dtype=f32, device=device)

    steps = [
        ("patch_embed fwd (fused)", True, lambda: PE._forward_fused(imgs, ids_keep, weight, bias, pos, p)),
        ("patch_embed gather (gemm fwd, bwd)", True, lambda: PE._gather_patches(imgs, ids_keep, p, dtype)),
        ("patch_embed imgs grad", False, lambda: PE._scatter_grad(torch.empty(N * K, P, dtype=dtype, device=device),
                                                                   ids_keep, imgs, p)),
        ("unshuffle fwd", True, lambda: UNSHUFFLE._forward(x, mask_token, ids_restore, dec_pos)),
        ("unshuffle bwd", True, lambda: UNSHUFFLE._backward_kernels(grad_dec, ids_restore, 1 + K, dtype)),
        ("loss fwd", True, lambda: LOSS._forward(pred, imgs, mask, None, p, norm_pix_loss)),
        ("loss bwd", True, lambda: LOSS._backward_kernel(grad_loss, pred, imgs, mask, None, p, norm_pix_loss)),
    ]
    out = []
    for label, in_training, run in steps:
        with recording_launches(execute=False) as rec:
            run()
        out.extend((label, in_training, lc) for lc in rec)
    return out


# ----------------------------------------------------------------------------- measuring
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def measure(lc: Launch, arch: int = 90) -> Dict[str, int]:
    """Compile one launch for sm_``arch`` and read ptxas's report of it (needs TRITON_DUMP_PTXAS_LOG=1
    and a cache that does not already hold the kernel: see ``fresh_build``)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        compiled = compile_launch(lc, arch)
    log = buf.getvalue()
    regs, frame = _PTXAS_REGS.findall(log), _PTXAS_FRAME.findall(log)
    if len(regs) != 1 or len(frame) != 1:
        raise RuntimeError(f"{lc.name}: expected one ptxas -v report, got:\n{log[-2000:]}")
    stack, spill_st, spill_ld = (int(v) for v in frame[0])
    return dict(registers=int(regs[0]), stack_bytes=stack, spill_store_bytes=spill_st, spill_load_bytes=spill_ld,
                shared_bytes=int(compiled.metadata.shared))


@contextlib.contextmanager
def fresh_build():
    """Environment in which ``triton.compile`` really runs ptxas and prints its -v log: an empty cache."""
    saved = {k: os.environ.get(k) for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="mae_fast_resources_") as cache:
        os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _tiles(lc: Launch) -> str:
    return " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in lc.args.items()
                    if k.startswith("BLOCK") or k in ("ROWS",))


def resource_rows(shapes: Sequence[str], batch: Optional[int] = None, dtype: torch.dtype = DTYPE) -> List[Dict]:
    """One row per (shape, kernel launch) of a run computing in ``dtype``: configuration and ptxas figures
    (identical builds reused)."""
    rows, seen = [], {}
    with fresh_build():
        for shape in shapes:
            model, img, default_batch = SHAPES[shape]
            for label, in_training, lc in model_launches(model_config(model, img), batch or default_batch,
                                                         dtype=dtype):
                key = (lc.name, tuple(sorted((k, repr(v)) for k, v in launch_signature(lc).items())),
                       tuple(sorted(lc.options.items())))
                if key not in seen:
                    seen[key] = measure(lc)
                rows.append(dict(shape=shape, dtype=str(dtype)[6:], op=label, kernel=lc.name, in_pretraining=in_training,
                                 tiles=_tiles(lc), grid=list(lc.grid), **lc.options, **seen[key]))
    return rows


def print_table(rows: List[Dict]) -> None:
    head = f"{'shape':12s} {'kernel':22s} {'op':34s} {'tiles':34s} {'w':>2s} {'st':>2s} {'regs':>4s} " \
           f"{'spill st/ld B':>13s} {'stack B':>7s} {'smem KiB':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['shape']:12s} {r['kernel']:22s} {r['op']:34s} {r['tiles']:34s} {r.get('num_warps', ''):>2} "
              f"{r.get('num_stages', '-'):>2} {r['registers']:4d} {r['spill_store_bytes']:>6d}/{r['spill_load_bytes']:<6d} "
              f"{r['stack_bytes']:7d} {r['shared_bytes'] / 1024:8.1f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mae_fast.bench.kernel_resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="headline shapes")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: mae-bench's preset batch)")
    ap.add_argument("--dtype", default="bf16", choices=list(PRECISION_DTYPES),
                    help="the run's compute dtype: bf16 / fp16 autocast (fp32 parameters), or fp32 / fp64 throughout")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    args = ap.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    if interpreting():
        ap.error("TRITON_INTERPRET=1 is set: unset it, the kernels must be built for the GPU")
    rows = resource_rows(args.shapes, args.batch, PRECISION_DTYPES[args.dtype])
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    spilling = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    if spilling:
        print(f"{len(spilling)} launch(es) spill registers: "
              + ", ".join(sorted({f"{r['kernel']} at {r['shape']}" for r in spilling})), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

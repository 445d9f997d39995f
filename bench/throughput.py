"""``mae-bench``: full MAE training steps per second, MFU and peak memory, side by side with peers.

Variants, same batch and precision policy, in one run:
  fused     mae-fast as it trains: Triton kernels on CUDA, auto attention backend, bf16 autocast
  torch     the same with ``kernel_backend="torch"`` (plain PyTorch ops)
  compile   ``fused`` under ``torch.compile``
  official  the official computation (embed all patches, math attention) with fp16 autocast + GradScaler
  hf        Hugging Face ``ViTMAEForPreTraining`` with SDPA (when transformers is installed)

    mae-bench --preset vit_l16_224
    mae-bench --device cpu --model mae_vit_tiny_patch8 --batch-size 8 --steps 3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from mae_fast.bench.records import record_header, write_result
from mae_fast.flops import build_on_meta, count_flops
from mae_fast.models_mae import MODELS, create_model

VARIANTS = ("fused", "torch", "compile", "official", "hf")

#: dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, most specific first
PEAK_TFLOPS = [("H100 PCIe", 756.5), ("H100", 989.5), ("H200", 989.5), ("GH200", 989.5), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0)]

PRESETS = {
    "vit_b16_224": dict(model="mae_vit_base_patch16", img_size=224, batch_size=256),
    "vit_l16_224": dict(model="mae_vit_large_patch16", img_size=224, batch_size=256),
    "vit_h14_224": dict(model="mae_vit_huge_patch14", img_size=224, batch_size=128),
    "vit_h14_448": dict(model="mae_vit_huge_patch14", img_size=448, batch_size=32, grad_checkpointing=1),
}


def peak_tflops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak from the table, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


def build_variant(variant: str, args: argparse.Namespace, device: torch.device):
    """(model, step-loss function, precision) of one variant; raises RuntimeError if unavailable."""
    kw = dict(img_size=args.img_size, norm_pix_loss=True)
    if variant in ("fused", "torch", "compile"):
        model = create_model(args.model, **kw).to(device)
        model.set_kernel_backend("auto" if variant != "torch" else "torch")
        model.check_kernels()
        model.set_attn_backend(args.attn_backend, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision))
        if args.grad_checkpointing:
            model.set_grad_checkpointing(args.grad_checkpointing)
        fn = model
        if variant == "compile":
            fn = torch.compile(model)
        return model, (lambda imgs: fn(imgs, mask_ratio=args.mask_ratio)[0]), args.precision
    if variant == "official":
        from .official_mae import official_model

        model = official_model(args.model, **kw).to(device)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(args.grad_checkpointing)
        return model, (lambda imgs: model(imgs, mask_ratio=args.mask_ratio)[0]), "fp16"
    if variant == "hf":
        try:
            from transformers import ViTMAEConfig, ViTMAEForPreTraining
        except ImportError as e:
            raise RuntimeError("transformers is not installed") from e
        c = build_on_meta(args.model, img_size=args.img_size).config
        cfg = ViTMAEConfig(hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                           intermediate_size=int(c.embed_dim * c.mlp_ratio), image_size=c.img_size,
                           patch_size=c.patch_size, decoder_hidden_size=c.decoder_embed_dim,
                           decoder_num_hidden_layers=c.decoder_depth, decoder_num_attention_heads=c.decoder_num_heads,
                           decoder_intermediate_size=int(c.decoder_embed_dim * c.mlp_ratio),
                           mask_ratio=args.mask_ratio, norm_pix_loss=True, layer_norm_eps=1e-6,
                           hidden_act="gelu", attn_implementation="sdpa")
        model = ViTMAEForPreTraining(cfg).to(device)
        if args.grad_checkpointing:
            model.gradient_checkpointing_enable()
        return model, (lambda imgs: model(pixel_values=imgs).loss), args.precision
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def time_steps(model: torch.nn.Module, loss_fn: Callable, precision: str, imgs: torch.Tensor, steps: int,
               warmup: int, next_batch: Optional[Callable[[], torch.Tensor]] = None) -> List[float]:
    """Seconds per full training step (forward, backward, fused AdamW step) after ``warmup`` steps."""
    device = imgs.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=True if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        batch = next_batch() if next_batch else imgs
        with ctx():
            loss = loss_fn(batch)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    last = float(loss.detach())
    if not math.isfinite(last):
        raise RuntimeError(f"non-finite loss {last}")
    return times


def run_variant(variant: str, args: argparse.Namespace, device: torch.device, flops_per_image: float,
                peak: Optional[float], data_loader=None) -> Dict:
    """Benchmark one variant; a variant that cannot run reports why instead of numbers."""
    row: Dict = {"variant": variant + ("+data" if data_loader is not None else "")}
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        model, loss_fn, precision = build_variant(variant, args, device)
        imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        next_batch: Optional[Callable[[], torch.Tensor]] = None
        if data_loader is not None:
            it = iter(data_loader)

            def next_from_loader() -> torch.Tensor:
                nonlocal it
                try:
                    return next(it).to(device, non_blocking=True)
                except StopIteration:
                    it = iter(data_loader)
                    return next(it).to(device, non_blocking=True)
            next_batch = next_from_loader
        times = time_steps(model, loss_fn, precision, imgs, args.steps, args.warmup, next_batch)
    except Exception as e:  # report, keep benchmarking the others
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    med = statistics.median(times)
    ips = args.batch_size / med
    row.update(precision=precision, images_per_s=ips, step_ms_median=med * 1e3,
               step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
               step_ms_stdev=(statistics.stdev(times) * 1e3) if len(times) > 1 else 0.0,
               tflops=ips * flops_per_image / 1e12,
               mfu=(ips * flops_per_image / (peak * 1e12)) if peak else None,
               peak_mem_gb=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None)
    del model
    return row


def benchmark(args: argparse.Namespace) -> Dict:
    """Run every requested variant for one (model, img_size, batch) and return the JSON record."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    report = count_flops(args.model, args.mask_ratio, img_size=args.img_size, norm_pix_loss=True)
    flops = report.total("training")
    peak = args.peak_tflops or peak_tflops(device)
    rows = [run_variant(v, args, device, flops, peak) for v in args.variants]
    if args.data:
        from mae_fast.train.data import build_loader

        loader = build_loader(args.data, batch_size=args.batch_size, img_size=args.img_size, device=device,
                              drop_last=True, dtype=torch.float32)
        rows.append(run_variant(args.variants[0], args, device, flops, peak, data_loader=loader))
    base = next((r for r in rows if r["variant"] == "official" and "images_per_s" in r), None)
    for r in rows:
        if base and "images_per_s" in r:
            r["vs_official"] = r["images_per_s"] / base["images_per_s"]
    return {
        **record_header("mae-bench", device, "mae-bench " + " ".join(args.argv)), "model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
        "precision": args.precision, "mask_ratio": args.mask_ratio, "grad_checkpointing": args.grad_checkpointing,
        "attn_backend": args.attn_backend, "steps": args.steps, "warmup": args.warmup,
        "train_gflops_per_image": flops / 1e9, "peak_tflops": peak, "results": rows,
    }


def format_table(rec: Dict) -> str:
    lines = [f"{rec['model']} @ {rec['img_size']}px, batch {rec['batch_size']}, {rec['device']}, "
             f"{rec['train_gflops_per_image']:.1f} GFLOPs/img (train), peak "
             f"{rec['peak_tflops'] or 'n/a'} TFLOP/s",
             f"{'variant':<14}{'img/s':>10}{'step ms (min-max)':>24}{'MFU':>8}{'mem GB':>9}{'vs official':>13}"]
    for r in rec["results"]:
        if "error" in r:
            lines.append(f"{r['variant']:<14}  unavailable: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "n/a"
        vs = f"{r['vs_official']:.2f}x" if "vs_official" in r else "-"
        span = f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f})"
        lines.append(f"{r['variant']:<14}{r['images_per_s']:>10.1f}{span:>24}{mfu:>8}{mem:>9}{vs:>13}")
    return "\n".join(lines)


def plot(records: List[Dict], path: str) -> None:
    """images/s per variant across the records (a batch-size or model sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model'].replace('mae_vit_', '')}\n{r['img_size']}px b{r['batch_size']}" for r in records]
    variants = sorted({x["variant"] for r in records for x in r["results"] if "images_per_s" in x})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(records)), 4))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ys = [next((x["images_per_s"] for x in r["results"] if x["variant"] == v and "images_per_s" in x), 0)
              for r in records]
        ax.bar([j + i * width for j in range(len(records))], ys, width, label=v)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(records))], labels, fontsize=8)
    ax.set_ylabel("images / s")
    ax.set_title(f"mae-bench on {records[0]['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mae-bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a headline configuration (sets model, size, batch)")
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="model; repeat to sweep models")
    p.add_argument("--img-size", type=int, default=None, help="image side (default 224, or the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 64, or the preset's)")
    p.add_argument("--sweep-batch", default="", help="comma-separated batch sizes to sweep, e.g. 64,128,256")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, autotune)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="mae-fast variants' autocast")
    p.add_argument("--attn-backend", default="auto", help="auto | sdpa | xformers | math")
    p.add_argument("--grad-checkpointing", type=int, default=None, help="checkpoint every k-th block (0: off)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from a table)")
    p.add_argument("--data", default=None, help="also time the fused step fed by the real loader from this folder")
    p.add_argument("--json", default=None, help="write the records here (on CUDA also under bench/results/)")
    p.add_argument("--plot", default=None, help="PNG of images/s per variant across the sweep")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    preset = PRESETS.get(args.preset, {})
    args.models = args.model or [preset.get("model", "mae_vit_large_patch16")]
    args.img_size = args.img_size or preset.get("img_size", 224)
    args.batch_size = args.batch_size or preset.get("batch_size", 64)
    if args.grad_checkpointing is None:
        args.grad_checkpointing = preset.get("grad_checkpointing", 0)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.sweep_batch.split(",") if b] or [args.batch_size]
    records = []
    for model in args.models:
        for batch in batches:
            run = argparse.Namespace(**{**vars(args), "model": model, "batch_size": batch})
            rec = benchmark(run)
            records.append(rec)
            print(format_table(rec), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(records, indent=2))
    if records and not records[0]["device"].startswith("cpu"):
        print(f"wrote {write_result(f'mae-bench-{args.models[0]}-{args.img_size}', records)}")
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0 if all("images_per_s" in r for rec in records for r in rec["results"]
                    if r["variant"] in ("fused", "torch")) else 1


if __name__ == "__main__":
    sys.exit(main())

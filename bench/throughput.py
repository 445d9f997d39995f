"""``mae-bench``: full MAE training steps per second, MFU and peak memory, side by side with peers.

Variants (``--variants``; each explained in one line by VARIANTS, ``--help`` and under the table) run the same
model, batch and synthetic images in one run. After its warm-up steps, each is timed in ``--rounds`` rounds of
``--steps`` steps, the variants interleaved (A B C, A B C, ...) so that a drift of the machine touches them all
alike; each row reports the median and quartiles of its step time, each ratio to the official-equivalent row its
range over the rounds, and a ratio whose range includes 1.0 (or whose rows' step-time quartiles overlap) is marked
within noise (``~`` in the table, ``within_noise`` in the record).

    mae-bench --preset vit_l16_224
    mae-bench --device cpu --model mae_vit_tiny_patch8 --img-size 32 --batch-size 8 --steps 3
    mae-bench --preset vit_h14_448 --img-size 224,336,448 --grow-batch tokens   # a progressive-resolution schedule

Several ``--img-size`` are swept like several ``--model``: each size is its own run (warm-up, rounds, record,
FLOPs and MFU at that size), its batch the same at every size or, with ``--grow-batch tokens``, scaled as
progressive-resolution pretraining scales it (``mae_fast.resolution.batch_multiple``).

Every row records what actually ran (kernels after the self-test, attention per site, compile mode,
precision, optimizer, clocks after timing); a row whose kernels fell back is labelled so and gets no
ratio. Records are written after every row and round, to bench/results/ on a GPU and to $MAE_RESULTS_DIR.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from torch._dynamo.utils import counters as dynamo_counters

from mae_fast.attention import BACKEND_NAMES
from mae_fast.compile import COMPILE_BACKENDS, COMPILE_MODES, apply_compile, resolve_compile_mode
from mae_fast.device import DEVICE_CHOICES, PRECISION_DTYPES, autocast_dtype, autocast_for, resolve_device, synchronize
from mae_fast.errors import ConfigError, DeviceError, MemoryPlanError
from mae_fast.flops import build_on_meta, count_flops
from mae_fast.kernels import backend_choices
from mae_fast.model_spec import ModelSpec, build_model
from mae_fast.models_mae import ACTIVATION_DTYPES, MODEL_CONFIGS, MODELS, MaskedAutoencoderViT
from mae_fast.resolution import GROW_BATCH, batch_multiple
from mae_fast.train.engine.loop import adamw_step
from mae_fast.train.engine.optim import fused_available, param_groups_weight_decay, set_lr

from .records import DefaultsHelpFormatter, nvidia_smi, record_header, utc_stamp, write_result

LR, BETAS, WEIGHT_DECAY = 1.5e-4, (0.9, 0.95), 0.05  # the recipe's (lr is blr at batch 256)


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration: overrides of the command line's mae-fast settings."""

    what: str
    kind: str = "mae"  # mae | official | hf
    kernels: str = "auto"
    compile: Optional[str] = None  # None: --compile
    activation_dtype: Optional[str] = None  # None: --activation-dtype
    checkpointing: bool = True  # False: no activation checkpointing whatever the preset says
    graphs: bool = False


VARIANTS: Dict[str, Variant] = {
    "official": Variant("the official code on today's torch (all patches embedded, math attention, fp16 + GradScaler, "
                        "foreach AdamW, a host sync per step): the baseline of every ratio",
                        kind="official", kernels="torch", compile="off"),
    "fused": Variant("mae-fast as mae-pretrain trains: Triton kernels, attention chosen per site, --compile, "
                     "fused AdamW"),
    "eager": Variant("fused with --compile off", compile="off"),
    "torch": Variant("fused with the PyTorch ops instead of the Triton kernels", kernels="torch"),
    "compile": Variant("fused with the whole model compiled (--compile model)", compile="model"),
    "bf16act": Variant("fused with a bf16 residual stream between blocks", activation_dtype="bf16"),
    "graphs": Variant("fused, whole step captured in one CUDA graph (capturable fused AdamW)", graphs=True),
    "no_ckpt": Variant("fused without activation checkpointing", checkpointing=False),
    "hf": Variant("Hugging Face ViTMAEForPreTraining, SDPA", kind="hf", kernels="torch", compile="off"),
}
#: variants that must run: an error in one of them makes mae-bench exit 1
REQUIRED = ("official", "fused", "eager", "torch")

#: dense bf16 tensor-core peaks (TFLOP/s) by device-name substring, most specific first
PEAK_TFLOPS = [("H100 PCIe", 756.5), ("H100", 989.5), ("H200", 989.5), ("GH200", 989.5), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0)]

PRESETS = {
    "vit_b16_224": dict(model="mae_vit_base_patch16", img_size=224, batch_size=256, grad_checkpointing=0,
                        what="ViT-B/16 at 224 px, batch 256, no activation checkpointing"),
    "vit_l16_224": dict(model="mae_vit_large_patch16", img_size=224, batch_size=256, grad_checkpointing=0,
                        what="ViT-L/16 at 224 px, batch 256, no activation checkpointing (the headline)"),
    "vit_h14_224": dict(model="mae_vit_huge_patch14", img_size=224, batch_size=128, grad_checkpointing=0,
                        what="ViT-H/14 at 224 px, batch 128, no activation checkpointing"),
    "vit_h14_448": dict(model="mae_vit_huge_patch14", img_size=448, batch_size=32, grad_checkpointing=1,
                        what="ViT-H/14 at 448 px, batch 32, every block checkpointed (fits an 80 GB GPU); "
                             "variant no_ckpt measures it without checkpointing (fits 141 GB, if at all)"),
}


class VariantUnavailable(RuntimeError):
    """This variant cannot run here (no CUDA, package missing); the row says why instead of numbers."""


def peak_tflops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak from the table, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


# ------------------------------------------------------------------------------------ building
def kernels_in_use(model: nn.Module, device: torch.device, requested: str) -> Dict[str, Any]:
    """After the kernel self-test: which ops really run, "triton" or "torch", and whether the Triton kernels
    fell back from ``requested`` (with the failing ops)."""
    after = model.kernel_backend
    uses_triton = after == "triton" or (after == "auto" and device.type == "cuda")
    status: Dict[str, Any] = {"kernel_backend": requested, "kernels": "triton" if uses_triton else "torch",
                              "kernels_fell_back": requested == "auto" and after == "torch"}
    if status["kernels_fell_back"]:
        status["kernel_failures"] = dict(model.kernel_failures)
    return status


def variant_spec(variant: Variant, args: argparse.Namespace, **overrides: Any) -> ModelSpec:
    """The model configuration ``variant`` runs (norm-pix loss): the official code's (fp16 autocast, math
    attention, no checkpointing, fp32 residual stream) or the command line's with the variant's overrides."""
    if variant.kind == "official":
        own = dict(precision="fp16", attn_backend="math", grad_checkpointing=0, activation_dtype="fp32")
    else:
        own = dict(grad_checkpointing=args.grad_checkpointing if variant.checkpointing else 0,
                   activation_dtype=variant.activation_dtype or args.activation_dtype)
    return ModelSpec.from_options(args, **{"norm_pix_loss": True, "kernel_backend": variant.kernels, **own,
                                           **overrides})


def build_mae(variant: Variant, args: argparse.Namespace, device: torch.device) -> Tuple[nn.Module, Dict[str, Any]]:
    """An mae-fast (or official-equivalent) model set up as ``variant`` asks, and what it runs."""
    spec = variant_spec(variant, args)
    cls = MaskedAutoencoderViT
    if variant.kind == "official":
        from .official_mae import OfficialMAE

        cls = OfficialMAE
    # initialized on the device: seconds, not minutes, for ViT-H
    model = build_model(spec, device, cls=cls, draw_on_device=True)
    info = kernels_in_use(model, device, spec.kernel_backend)
    compiled = apply_compile(model, variant.compile or args.compile, device, backend=args.compile_backend)
    info.update(precision=spec.precision, attention=model.attn_choices, compile=compiled,
                compile_backend=args.compile_backend if compiled != "off" else None,
                grad_checkpointing=spec.grad_checkpointing, activation_dtype=spec.activation_dtype)
    return model, info


def build_hf(args: argparse.Namespace, device: torch.device) -> Tuple[nn.Module, Dict[str, Any]]:
    """Hugging Face ViTMAEForPreTraining of the same shape (SDPA attention, norm-pix loss)."""
    try:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining
    except ImportError as e:
        raise VariantUnavailable("transformers is not installed") from e
    c = build_on_meta(args.model, img_size=args.img_size).config
    cfg = ViTMAEConfig(hidden_size=c.embed_dim, num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                       intermediate_size=int(c.embed_dim * c.mlp_ratio), image_size=c.img_size,
                       patch_size=c.patch_size, decoder_hidden_size=c.decoder_embed_dim,
                       decoder_num_hidden_layers=c.decoder_depth, decoder_num_attention_heads=c.decoder_num_heads,
                       decoder_intermediate_size=int(c.decoder_embed_dim * c.mlp_ratio),
                       mask_ratio=args.mask_ratio, norm_pix_loss=True, layer_norm_eps=1e-6,
                       hidden_act="gelu", attn_implementation="sdpa")
    with torch.device(device):
        model = ViTMAEForPreTraining(cfg)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    ran = f"{getattr(model.config, '_attn_implementation', None) or 'unknown'} (transformers)"  # what it resolved to
    return model, {"kernel_backend": "torch", "kernels": "torch", "kernels_fell_back": False,
                   "precision": args.precision, "attention": {"encoder": {"backend": ran}, "decoder": {"backend": ran}},
                   "compile": "off", "grad_checkpointing": args.grad_checkpointing, "activation_dtype": "fp32"}


def loss_of(model: nn.Module, kind: str, mask_ratio: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "hf":
        return lambda imgs: model(pixel_values=imgs).loss
    return lambda imgs: model(imgs, mask_ratio=mask_ratio)[0]


# ------------------------------------------------------------------------------------ steps
StepFn = Callable[[torch.Tensor], torch.Tensor]


def mae_fast_step(model: nn.Module, loss_fn: StepFn, precision: str, device: torch.device
                  ) -> Tuple[StepFn, str, Callable[[], None]]:
    """The training step mae-pretrain runs (StepRunner: fused AdamW, non-finite steps skipped on the
    device, no host sync); returns (step, description, check that raises if a step was non-finite)."""
    runner = adamw_step(precision, LR, WEIGHT_DECAY)(model, device)

    def step(imgs: torch.Tensor) -> torch.Tensor:
        with autocast_for(precision, device):
            loss = loss_fn(imgs)
        runner.backward(loss, 0, imgs.shape[0])
        runner.optimizer_step(0)
        return loss

    fused = "fused" if fused_available(model) else "foreach/for-loop"  # as build_adamw chose
    return step, f"StepRunner: {fused} AdamW, GradScaler found-inf skip, no host sync", lambda: runner.check(None)


def official_grad_norm(params: List[nn.Parameter]) -> torch.Tensor:
    """util/misc.py get_grad_norm_: the 2-norm of the per-parameter gradient norms."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    return torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)


def official_step(model: nn.Module, loss_fn: StepFn, device: torch.device) -> Tuple[StepFn, str, Callable[[], None]]:
    """engine_pretrain.train_one_epoch's step (accum_iter 1): lr set per iteration, fp16 autocast,
    loss.item() and a finiteness check, NativeScalerWithGradNormCount (scale, backward, unscale_, grad
    norm, step, update), zero_grad, torch.cuda.synchronize()."""
    opt = torch.optim.AdamW(param_groups_weight_decay(model, WEIGHT_DECAY), lr=LR, betas=BETAS)
    scaler = torch.amp.GradScaler(device.type)
    params = list(model.parameters())

    def step(imgs: torch.Tensor) -> torch.Tensor:
        set_lr(opt, LR)
        with torch.autocast(device.type, dtype=torch.float16):
            loss = loss_fn(imgs)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"official step: loss is {value}")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        official_grad_norm(params)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        synchronize(device)
        return loss

    return step, "official: foreach AdamW, fp16 GradScaler + unscale + grad norm, loss.item() + sync", lambda: None


def graphed_step(model: nn.Module, loss_fn: StepFn, precision: str, imgs: torch.Tensor
                 ) -> Tuple[StepFn, str, Callable[[], None]]:
    """Forward, backward and a fused capturable AdamW (tensor lr) captured once as a CUDA graph after
    3 warm-up steps on a side stream; each step copies the batch in and replays. torch.compile's
    "reduce-overhead" would graph each compiled block alone, not the optimizer: one manual capture
    of the whole step removes every launch gap."""
    device = imgs.device
    if device.type != "cuda":
        raise VariantUnavailable("needs CUDA")
    if precision == "fp16":
        raise VariantUnavailable("fp16's dynamic GradScaler is not captured; use --precision bf16")
    lr = torch.tensor(LR, device=device)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, WEIGHT_DECAY), lr=lr, betas=BETAS, fused=True,
                            capturable=True)
    static = imgs.clone()
    dtype = autocast_dtype(precision)

    def body() -> torch.Tensor:
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False):
            loss = loss_fn(static)
        loss.backward()
        opt.step()
        return loss.detach()

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # gradients are then allocated in the graph's pool, overwritten each replay
    with torch.cuda.graph(graph):
        static_loss = body()

    def step(batch: torch.Tensor) -> torch.Tensor:
        if batch is not imgs:
            static.copy_(batch, non_blocking=True)
        graph.replay()
        return static_loss

    return step, "CUDA graph of forward + backward + fused capturable AdamW (no non-finite skip)", lambda: None


# ------------------------------------------------------------------------------------ timing
Clock = Callable[[], float]


def time_steps(step: StepFn, imgs: torch.Tensor, steps: int, next_batch: Optional[Callable[[], torch.Tensor]] = None,
               clock: Clock = time.perf_counter) -> Dict[str, Any]:
    """Seconds of each of ``steps`` steps (CUDA events on a GPU, no host sync between steps; ``clock`` on a CPU)
    and the wall time of all of them; raises if the last loss is not finite."""
    device = imgs.device
    cuda = device.type == "cuda"
    marks: List[Any] = []
    synchronize(device)
    t0 = clock()
    for _ in range(steps):
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(clock())
        loss = step(next_batch() if next_batch else imgs)
    if cuda:
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
    synchronize(device)
    wall = clock() - t0
    if not cuda:
        marks.append(t0 + wall)
    times = [(a.elapsed_time(b) / 1e3) if cuda else (b - a) for a, b in zip(marks, marks[1:])]
    last = float(loss.detach())
    if not math.isfinite(last):
        raise RuntimeError(f"non-finite loss {last}")
    return {"times": times, "wall_s": wall, "last_loss": last}


def warm_up(step: StepFn, imgs: torch.Tensor, warmup: int, next_batch: Optional[Callable[[], torch.Tensor]] = None
            ) -> float:
    """Run ``warmup`` untimed steps (compile, autotune, allocator); returns the first one's seconds."""
    first = 0.0
    for i in range(warmup):
        t0 = time.perf_counter()
        step(next_batch() if next_batch else imgs)
        synchronize(imgs.device)
        if i == 0:
            first = time.perf_counter() - t0
    return first


@functools.lru_cache(maxsize=16)
def predicted_peak_gb(spec: ModelSpec) -> Optional[float]:
    """Peak memory (GiB) that ``mae_fast.memory`` predicts for the step of ``spec`` on CUDA, or None if it cannot."""
    from mae_fast.memory import predict_memory

    try:
        pred = predict_memory(spec, adamw_step(spec.precision, LR, WEIGHT_DECAY), "cuda")
    except Exception as e:  # a prediction must never cost the measurement
        print(f"  memory prediction unavailable: {type(e).__name__}: {e}", flush=True)
        return None
    return pred.peak_bytes / 2**30


@dataclass
class Ready:
    """A variant built and warmed up, waiting for its timed rounds; ``rounds`` holds what each round measured."""

    row: Dict[str, Any]
    step: StepFn
    imgs: torch.Tensor
    next_batch: Optional[Callable[[], torch.Tensor]]
    check: Callable[[], None]
    rounds: List[Dict[str, Any]] = field(default_factory=list)


def prepare_variant(name: str, args: argparse.Namespace, device: torch.device, data_loader=None
                    ) -> Tuple[Dict[str, Any], Optional[Ready]]:
    """Build one variant and run its warm-up steps: (its row, the variant ready to time), or (a row saying why
    it cannot run, None). The row's memory peak is its own: memory other variants hold is subtracted."""
    variant = VARIANTS[name]
    row: Dict[str, Any] = {"variant": name + ("+data" if data_loader is not None else ""), "what": variant.what,
                           "batch_size": args.batch_size}
    gc.collect()
    held = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    dynamo_counters.clear()  # this row's graphs and graph breaks only
    try:
        if name == "no_ckpt" and not args.grad_checkpointing:
            raise VariantUnavailable("same as fused: this configuration does not checkpoint")
        if variant.graphs and device.type != "cuda":
            raise VariantUnavailable("needs CUDA")
        torch.manual_seed(0)
        model, info = build_hf(args, device) if variant.kind == "hf" else build_mae(variant, args, device)
        row.update(info)
        imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        loss_fn = loss_of(model, variant.kind, args.mask_ratio)
        model.train()
        t_setup = time.perf_counter()
        if variant.kind == "official":
            step, how, check = official_step(model, loss_fn, device)
        elif variant.graphs:
            step, how, check = graphed_step(model, loss_fn, row["precision"], imgs)
        else:
            step, how, check = mae_fast_step(model, loss_fn, row["precision"], device)
        setup_s = time.perf_counter() - t_setup
        row.update(step=how, cuda_graphs=variant.graphs)
        next_batch = _loader_batches(data_loader, device) if data_loader is not None else None
        first = warm_up(step, imgs, args.warmup, next_batch)
    except VariantUnavailable as e:
        return {**row, "unavailable": str(e)}, None
    except Exception as e:  # report, keep benchmarking the others
        return {**row, "error": one_line(e)}, None
    row.update(compiled=compiled_what_ran(), first_step_s=setup_s if variant.graphs else first,  # graphs: + capture
               peak_mem_gb=((torch.cuda.max_memory_allocated(device) - held) / 2**30) if device.type == "cuda"
               else None)
    if row.get("kernels") == "triton":  # the implementation each op timed its way to (patch embedding: fused | gemm)
        row["kernel_choices"] = backend_choices()
    if device.type == "cuda" and variant.kind not in ("hf", "official"):  # the measured peak beside the prediction
        row["predicted_peak_gb"] = predicted_peak_gb(variant_spec(variant, args, kernel_backend=model.kernel_backend))
    if row.get("compile", "off") != "off":
        print(f"  {row['variant']}: first step {row['first_step_s']:.1f} s (includes torch.compile {row['compile']})",
              flush=True)
    return row, Ready(row, step, imgs, next_batch, check)


def one_line(e: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def time_round(ready: List[Ready], steps: int, clock: Clock = time.perf_counter) -> List[Ready]:
    """One round: each variant's ``steps`` timed steps in turn (A B C ...); returns the variants still running
    (one that fails gets an error row and leaves the rounds)."""
    running = []
    for r in ready:
        try:
            r.rounds.append(time_steps(r.step, r.imgs, steps, r.next_batch, clock))
            running.append(r)
        except Exception as e:
            r.row.update(error=one_line(e))
    return running


def check_each(ready: List[Ready]) -> None:
    """Each variant's own end-of-run check (a non-finite step skipped on the device); a failure marks its row."""
    for r in ready:
        try:
            r.check()
        except Exception as e:
            r.row.update(error=one_line(e))


def quartiles(values: List[float]) -> Tuple[float, float]:
    """(first, third) quartile of ``values`` (inclusive method; a single value is its own quartiles)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(r: Ready, flops_per_image: float, peak: Optional[float]) -> None:
    """The row's figures over the rounds timed so far: images/s over all of them and per round, the median and
    quartiles (and min, max) of its step times."""
    times = [t for rnd in r.rounds for t in rnd["times"]]
    batch = r.row["batch_size"]
    ips = batch * len(times) / sum(rnd["wall_s"] for rnd in r.rounds)
    q1, q3 = quartiles(times)
    r.row.update(images_per_s=ips, images_per_s_rounds=[batch * len(rnd["times"]) / rnd["wall_s"] for rnd in r.rounds],
                 rounds=len(r.rounds), steps_per_round=len(r.rounds[0]["times"]),
                 step_ms_mean=1e3 * sum(rnd["wall_s"] for rnd in r.rounds) / len(times),
                 step_ms_median=statistics.median(times) * 1e3, step_ms_q1=q1 * 1e3, step_ms_q3=q3 * 1e3,
                 step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                 step_ms_stdev=(statistics.stdev(times) * 1e3) if len(times) > 1 else 0.0,
                 last_loss=r.rounds[-1]["last_loss"], tflops=ips * flops_per_image / 1e12,
                 mfu=(ips * flops_per_image / (peak * 1e12)) if peak else None)


def compiled_what_ran() -> Dict[str, Any]:
    """Graphs dynamo compiled for this row and its graph breaks (reason: count): a compiled row whose regions
    broke runs partly eager, and the record says so."""
    breaks = {str(reason)[:200]: n for reason, n in dynamo_counters["graph_break"].items()}
    return {"graphs": dynamo_counters["stats"]["unique_graphs"], "graph_breaks": breaks}


def _loader_batches(loader, device: torch.device) -> Callable[[], torch.Tensor]:
    it = iter(loader)

    def next_batch() -> torch.Tensor:
        nonlocal it
        try:
            return next(it).to(device, non_blocking=True)
        except StopIteration:
            it = iter(loader)
            return next(it).to(device, non_blocking=True)
    return next_batch


def usable_for_ratio(row: Dict[str, Any]) -> bool:
    """A measured row whose kernels are the ones it claims (no fallback) and that did not fail later."""
    return "images_per_s" in row and "error" not in row and not row.get("kernels_fell_back", False)


def within_noise(row: Dict[str, Any], base: Dict[str, Any], ratios: List[float]) -> bool:
    """A ratio is within noise when its range over the rounds includes 1.0, or when the two rows' step-time
    quartile ranges overlap."""
    if ratios and min(ratios) <= 1.0 <= max(ratios):
        return True
    if "step_ms_q1" not in row or "step_ms_q1" not in base:
        return False
    return row["step_ms_q1"] <= base["step_ms_q3"] and base["step_ms_q1"] <= row["step_ms_q3"]


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """vs_official on every usable row when the official row was measured, with its range over the rounds
    (the ratio of each round's images/s) and whether it is within noise; labels fallbacks and graph breaks."""
    base = next((r for r in rows if r["variant"] == "official" and usable_for_ratio(r)), None)
    for r in rows:
        breaks = sum(r.get("compiled", {}).get("graph_breaks", {}).values())
        r["label"] = (r["variant"] + (" [kernels fell back to torch]" if r.get("kernels_fell_back") else "")
                      + (f" [{breaks} graph breaks]" if breaks else ""))
        for key in ("vs_official", "vs_official_range", "within_noise"):
            r.pop(key, None)
        if base and usable_for_ratio(r):
            r["vs_official"] = r["images_per_s"] / base["images_per_s"]
            if r is base:
                continue
            mine, theirs = r.get("images_per_s_rounds", []), base.get("images_per_s_rounds", [])
            ratios = [a / b for a, b in zip(mine, theirs)]
            if ratios:
                r["vs_official_range"] = [min(ratios), max(ratios)]
            r["within_noise"] = within_noise(r, base, ratios)


def benchmark(args: argparse.Namespace, device: torch.device,
              emit: Callable[[Dict[str, Any]], None] = lambda rec: None, clock: Clock = time.perf_counter
              ) -> Dict[str, Any]:
    """Run every requested variant for one (model, img_size, batch): build and warm up each, then time them
    interleaved, ``args.rounds`` rounds of ``args.steps`` steps each (A B C A B C ...); one round runs each
    variant to the end and frees it before the next (one model in memory at a time). ``emit(record)`` after
    each row is built and after each round."""
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # past the limit a compiled block would
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # run eager unnoticed: make that row an error
    report = count_flops(args.model, args.mask_ratio, img_size=args.img_size, norm_pix_loss=True)
    flops = report.total("training")
    peak = args.peak_tflops or peak_tflops(device)
    record = {
        **record_header("mae-bench", device, "mae-bench " + " ".join(args.argv)), "model": args.model,
        "img_size": args.img_size, "batch_size": args.batch_size,
        **({"size_sweep": args.size_sweep} if args.size_sweep else {}), "preset": args.preset,
        "preset_what": PRESETS.get(args.preset, {}).get("what"), "precision": args.precision,
        "mask_ratio": args.mask_ratio, "grad_checkpointing": args.grad_checkpointing,
        "attn_backend": args.attn_backend, "compile": args.compile,
        "compile_resolved": resolve_compile_mode(args.compile, device), "activation_dtype": args.activation_dtype,
        "steps": args.steps, "rounds": args.rounds, "interleaved": args.rounds > 1, "warmup": args.warmup,
        "train_gflops_per_image": flops / 1e9, "peak_tflops": peak,
        "mfu_flops": "mae-flops training FLOPs (2 per multiply-add, visible patches only, no recompute)",
        "results": [],
    }
    rows = record["results"]
    jobs: List[Tuple[str, Any]] = [(v, None) for v in args.variants]
    if args.data:
        from mae_fast.train.data.loaders import build_loader

        loader = build_loader(args.data, batch_size=args.batch_size, img_size=args.img_size, device=device,
                              drop_last=True, dtype=torch.float32)
        jobs.append(("fused", loader))

    def finish(ready: List[Ready]) -> None:
        for r in ready:
            if r.rounds:
                summarize(r, flops, peak)
        add_ratios(rows)
        emit(record)

    ready: List[Ready] = []
    for name, loader in jobs:
        row, r = prepare_variant(name, args, device, data_loader=loader)
        rows.append(row)
        if r is not None and args.rounds == 1:  # not interleaved: time it now, then free it
            check_each(time_round([r], args.steps, clock))
            finish([r])
            r = None
        elif r is not None:
            ready.append(r)
        add_ratios(rows)
        emit(record)
    for _ in range(args.rounds if ready else 0):
        ready = time_round(ready, args.steps, clock)
        finish(ready)
    check_each(ready)
    add_ratios(rows)
    if device.type == "cuda":
        clocks = {k: v for k, v in nvidia_smi(device.index or 0).items() if k != "driver"}
        for row in rows:
            if "images_per_s" in row:
                row["clocks_after"] = clocks
    emit(record)
    return record


def variant_notes(names: List[str]) -> List[str]:
    """One line per variant name: what it runs."""
    width = max(len(n) for n in names)
    return [f"  {n:<{width}}  {VARIANTS[n.split('+')[0]].what}" + (" (fed by the real loader)" if "+" in n else "")
            for n in names]


def aligned(rows: List[List[str]], right: Set[int]) -> List[str]:
    """``rows`` (the first one the header) as lines of aligned columns, the columns in ``right`` right-aligned."""
    widths = [max(len(c) for c in col) for col in zip(*rows)]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
            for cells in rows]


def sweep_note(rec: Dict[str, Any]) -> str:
    """What follows ``batch N`` in a record of a size sweep (`` = 4 x 32 (--grow-batch tokens), size 1 of
    224/336/448 px``); empty for a single size."""
    sweep = rec.get("size_sweep")
    if not sweep:
        return ""
    scaled = (f" = {sweep['batch_multiple']} x {sweep['base_batch']} (--grow-batch tokens)"
              if sweep["batch_multiple"] > 1 else "")
    return (f"{scaled}, size {sweep['sizes'].index(rec['img_size']) + 1} of "
            f"{'/'.join(map(str, sweep['sizes']))} px")


def format_sweep(records: List[Dict[str, Any]]) -> str:
    """One line per measured row of every record: images/s and MFU at each model, size and batch of a sweep."""
    head = ["model", "px", "batch", "GFLOPs/img", "variant", "img/s", "MFU"]
    table = [[rec["model"], str(rec["img_size"]), str(r["batch_size"]), f"{rec['train_gflops_per_image']:.3g}",
              r.get("label", r["variant"]), f"{r['images_per_s']:.1f}", f"{r['mfu']:.1%}" if r["mfu"] is not None
              else "n/a"] for rec in records for r in rec["results"] if "images_per_s" in r and "error" not in r]
    return "\n".join(["Sweep (training FLOPs per image at each size; MFU from them):",
                      *aligned([head, *table], right={1, 2, 3, 5, 6})])


def format_table(rec: Dict[str, Any]) -> str:
    """The record as an aligned table, the notes that explain it below."""
    head = ["variant", "img/s", "step ms median [q1-q3]", "MFU", "mem GB", "vs official [rounds]", "kernels",
            "compile", "attention enc/dec"]
    table, failed = [], []
    for r in rec["results"]:
        label = r.get("label", r["variant"])
        if "images_per_s" not in r or "error" in r:
            why = r.get("unavailable") or r.get("error")
            failed.append(f"{label}: {'unavailable' if 'unavailable' in r else 'FAILED'}: {why}")
            continue
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "n/a"
        if r.get("predicted_peak_gb") is not None:
            mem += f"/{r['predicted_peak_gb']:.1f}"  # measured / predicted
        vs = "-"
        if "vs_official" in r:
            vs = f"{r['vs_official']:.2f}x"
            if "vs_official_range" in r:
                lo, hi = r["vs_official_range"]
                vs += f" [{lo:.2f}-{hi:.2f}]"
            if r.get("within_noise"):
                vs += " ~"
        table.append([label, f"{r['images_per_s']:.1f}",
                      f"{r['step_ms_median']:.1f} [{r['step_ms_q1']:.1f}-{r['step_ms_q3']:.1f}]",
                      f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a", mem, vs, r["kernels"], r["compile"],
                      "/".join(str(s.get("backend")) for s in r.get("attention", {}).values())])
    rounds, steps = rec.get("rounds", 1), rec["steps"]
    lines = [*aligned([head, *table], right={1, 2, 3, 4, 5}), *failed, "",
             f"{rec['model']} @ {rec['img_size']} px, batch {rec['batch_size']}{sweep_note(rec)}, {rec['device']}, "
             f"{rec['train_gflops_per_image']:.3g} GFLOPs per image (training), peak "
             f"{rec['peak_tflops'] or 'n/a'} TFLOP/s.",
             (f"Timed {rounds} rounds of {steps} steps per variant, variants interleaved (A B C, A B C, ...) after "
              f"{rec['warmup']} warm-up steps each." if rounds > 1 else
              f"Timed {steps} steps per variant, one variant after another (--rounds 1), after {rec['warmup']} "
              "warm-up steps each."),
             "vs official: images/s over the official row's, over all rounds [lowest-highest of the rounds' own "
             "ratios]; ~ within noise: that range includes 1.0 or the two rows' step-time quartiles overlap.",
             "mem: measured peak / peak predicted by mae_fast.memory, GiB.",
             "Variants:", *variant_notes([r["variant"] for r in rec["results"]])]
    return "\n".join(lines)


def plot(records: List[Dict[str, Any]], path: str) -> None:
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


# ------------------------------------------------------------------------------------ command line
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mae-bench", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter,
                                epilog="variants:\n" + "\n".join(variant_notes(list(VARIANTS))))
    p.add_argument("--preset", choices=sorted(PRESETS), help="a headline configuration (model, size, batch, "
                   "checkpointing): " + "; ".join(f"{k}: {v['what']}" for k, v in PRESETS.items()))
    p.add_argument("--model", action="append", choices=sorted(MODELS), help="model; repeat to sweep models")
    p.add_argument("--img-size", action="append", default=None, metavar="PX[,PX...]", help="image side (default "
                   "224, or the preset's); several (repeat it, or a comma list: 224,336,448) sweep the sizes of a "
                   "progressive-resolution schedule, each run and recorded on its own with FLOPs and MFU at its size")
    p.add_argument("--grow-batch", choices=GROW_BATCH, default="fixed", help="the batch at each size of a size "
                   "sweep: fixed: --batch-size at every size; tokens: --batch-size x floor(L_max / L) at a size of L "
                   "patches (progressive-resolution pretraining's rule: about the largest size's tokens per batch)")
    p.add_argument("--batch-size", default=None, help="images per step (default 64, or the preset's); auto: the "
                   "largest that fits the CUDA device's memory, predicted")
    p.add_argument("--sweep-batch", default="", help="comma-separated batch sizes to sweep, e.g. 64,128,256")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each variant in each round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of timed steps, the variants interleaved in each "
                   "(A B C, A B C, ...): each row reports its spread and each ratio its range over the rounds; 1: "
                   "each variant timed alone and freed before the next (one model in memory at a time)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each variant first (compile, autotune)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants below")
    p.add_argument("--precision", choices=[n for n in PRECISION_DTYPES if n != "fp64"], default="bf16",
                   help="every variant but official (always fp16): bf16 / fp16 autocast or fp32, stepped as "
                        "mae-pretrain does (a GradScaler, dynamic under fp16, else at scale 1: it only skips "
                        "non-finite updates; graphs has no scaler and refuses fp16)")
    p.add_argument("--attn-backend", default="auto", choices=BACKEND_NAMES, help="mae-fast variants' attention")
    p.add_argument("--compile", default="auto", choices=COMPILE_MODES, help="mae-fast variants' torch.compile")
    p.add_argument("--compile-backend", default="inductor", choices=COMPILE_BACKENDS,
                   help="torch.compile backend (aot_eager / eager: trace only, for checks and dry runs)")
    p.add_argument("--activation-dtype", default="fp32", choices=sorted(ACTIVATION_DTYPES),
                   help="mae-fast variants' residual stream between blocks (bf16 needs --precision bf16)")
    p.add_argument("--grad-checkpointing", type=int, default=None, help="checkpoint every k-th block (0: off)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed")
    p.add_argument("--device", default="auto", help=" | ".join(DEVICE_CHOICES))
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from a table)")
    p.add_argument("--data", default=None, help="also time the fused step fed by the real loader from this folder")
    p.add_argument("--json", default=None, help="also write the records here")
    p.add_argument("--no-save", action="store_true", help="write no record to bench/results/ or $MAE_RESULTS_DIR")
    p.add_argument("--plot", default=None, help="PNG of images/s per variant across the sweep")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    preset = PRESETS.get(args.preset, {})
    args.models = args.model or [preset.get("model", "mae_vit_large_patch16")]
    try:
        sizes = [int(s) for given in args.img_size or [] for s in given.split(",") if s.strip()]
    except ValueError:
        p.error(f"--img-size takes sizes in px, one or a comma list (224,336,448), got {args.img_size}")
    args.img_sizes = list(dict.fromkeys(sizes)) or [preset.get("img_size", 224)]  # in order, each once
    if min(args.img_sizes) < 1:
        p.error(f"--img-size must be >= 1, got {min(args.img_sizes)}")
    args.img_size, args.size_sweep = args.img_sizes[0], None  # each run's own (main)
    args.batch_size = args.batch_size or preset.get("batch_size", 64)
    if args.batch_size != "auto":
        try:
            args.batch_size = int(args.batch_size)
        except ValueError:
            p.error(f"--batch-size must be a positive integer or 'auto', got {args.batch_size!r}")
        if args.batch_size < 1:
            p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.grad_checkpointing is None:
        args.grad_checkpointing = preset.get("grad_checkpointing", 0)
    if args.grad_checkpointing < 0:
        p.error(f"--grad-checkpointing must be >= 0, got {args.grad_checkpointing}")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        p.error(f"--steps, --rounds and --warmup must be >= 1, got {args.steps}, {args.rounds} and {args.warmup}")
    if args.activation_dtype == "bf16" and args.precision != "bf16":
        p.error("--activation-dtype bf16 needs --precision bf16 (the residual stream is kept in autocast's dtype)")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if "bf16act" in args.variants and args.precision != "bf16":
        p.error("variant bf16act needs --precision bf16")
    return args


class Run(NamedTuple):
    """One entry of a sweep: a model at one image size and batch (``"auto"``: planned when it runs); ``size_sweep``
    says where it stands in a sweep of several sizes (None: one size)."""

    model: str
    img_size: int
    batch_size: Union[int, str]
    size_sweep: Optional[Dict[str, Any]]


def sweep_plan(models: List[str], sizes: List[int], batches: List[Union[int, str]], grow_batch: str = "fixed"
               ) -> List[Run]:
    """Every run, in order (model, then size, then batch); ConfigError (one line) before any runs when a size is not
    a multiple of a model's patch size. With several sizes and ``grow_batch`` "tokens" the batch at a size is the
    given one x ``batch_multiple(size, max(sizes), patch)``, as progressive-resolution pretraining scales it
    ("fixed": the given one at every size; "auto" is planned at each size on its own)."""
    if grow_batch not in GROW_BATCH:
        raise ConfigError(f"--grow-batch {grow_batch!r} is not one of {', '.join(GROW_BATCH)}")
    if grow_batch == "tokens" and len(sizes) > 1 and "auto" in batches:
        raise ConfigError("--grow-batch tokens scales a given --batch-size; auto plans each size's batch on its own "
                          "(use --grow-batch fixed)")
    runs = []
    for model in models:
        patch = MODEL_CONFIGS[model]["patch_size"]
        bad = next((size for size in sizes if size % patch), None)
        if bad is not None:
            raise ConfigError(f"--img-size {bad} is not a multiple of the patch size {patch} of {model}")
        for size in sizes:
            multiple = batch_multiple(size, max(sizes), patch) if grow_batch == "tokens" else 1
            for batch in batches:
                sweep = None if len(sizes) == 1 else {"sizes": list(sizes), "grow_batch": grow_batch,
                                                      "base_batch": batch, "batch_multiple": multiple}
                runs.append(Run(model, size, batch if batch == "auto" else batch * multiple, sweep))
    return runs


def resolve_batch(args: argparse.Namespace, model: str, device: torch.device) -> int:
    """``--batch-size auto``: the largest batch that ``mae_fast.memory.plan_batch`` predicts fits this GPU
    at ``args.img_size`` and ``--grad-checkpointing``; MemoryPlanError (one line) on a CPU or when nothing fits."""
    from mae_fast.memory import StepTracer, plan_batch

    if device.type != "cuda":
        raise MemoryPlanError("--batch-size auto plans for a CUDA device's memory; on a CPU give a number")
    spec = variant_spec(VARIANTS["fused"], args, model=model, batch_size=1)  # each trace sets its own batch
    plan = plan_batch(StepTracer(spec, adamw_step(args.precision, LR, WEIGHT_DECAY), device.type),
                      grad_checkpointing=args.grad_checkpointing)
    print(f"--batch-size auto: {plan.describe()}", flush=True)
    return plan.batch_size


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.sweep_batch.split(",") if b] or [args.batch_size]
    try:
        runs = sweep_plan(args.models, args.img_sizes, batches, args.grow_batch)
        device = resolve_device(args.device)
    except (ConfigError, DeviceError) as e:
        print(f"mae-bench: error: {e}", file=sys.stderr)
        return 2
    if args.preset:
        print(f"preset {args.preset}: {PRESETS[args.preset]['what']}", flush=True)
    records: List[Dict[str, Any]] = []
    for entry in runs:
        run = argparse.Namespace(**{**vars(args), **entry._asdict()})
        if run.batch_size == "auto":
            try:
                run.batch_size = resolve_batch(run, entry.model, device)
            except MemoryPlanError as e:
                print(f"mae-bench: error: {e}", file=sys.stderr)
                return 2
        if records:  # each entry compiles as if run alone: no cache entries piling up towards the recompile
            # limit (sizes x models x variants x block sites), no shape marked dynamic by the entry before
            torch._dynamo.reset()
        stamp = utc_stamp()
        prefix = f"mae-bench-{run.model}-{run.img_size}-b{run.batch_size}"

        def emit(rec: Dict[str, Any], prefix: str = prefix, stamp: str = stamp) -> None:
            if not args.no_save:
                write_result(prefix, rec, stamp=stamp)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps([*records, rec], indent=2))

        rec = benchmark(run, device, emit)
        records.append(rec)
        print(format_table(rec), flush=True)
        if not args.no_save:
            path = write_result(prefix, rec, stamp=stamp)
            print(f"wrote {path}" if path else "no record written (a CPU run goes only to $MAE_RESULTS_DIR)")
    if len(args.img_sizes) > 1:
        print("\n" + format_sweep(records), flush=True)
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}")
    failed = [r["variant"] for rec in records for r in rec["results"] if "error" in r and r["variant"] in REQUIRED]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""``mae-flops``: per-part FLOPs and parameters of MAE models, as a table or JSON.

    mae-flops                                   # ViT-B/L/H at 224
    mae-flops --model mae_vit_huge_patch14 --img-size 448 --check
    mae-flops --model mae_vit_large_patch16 --img-size 224 --img-size 448   # one table per size
    mae-flops --json > flops.json
    mae-flops --model mae_vit_huge_patch14 --img-size 448 --grow-from 224 --grow-epochs 960   # a schedule's cost
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from mae_fast.flops import FlopsReport, count_flops
from mae_fast.models_mae import MODELS
from mae_fast.resolution import from_options, schedule_training_flops

from .records import DefaultsHelpFormatter

DEFAULT_MODELS = ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"]
DEFAULT_IMG_SIZE = 224
#: the paper's ablations (Table 1): ViT-L/16 at 224 px, mask ratio 0.75, an 8-block 512-wide decoder
PAPER_SETTING = {"model": "mae_vit_large_patch16", "img_size": 224, "mask_ratio": 0.75,
                 "decoder_depth": 8, "decoder_embed_dim": 512}
#: Table 1c: the whole model's training FLOPs with mask tokens in the encoder over MAE's
PAPER_MODEL_RATIO = 3.3

TRAIN_GF_NOTE = (
    "train GF = forward + backward FLOPs per image (backward 2x forward per matmul, 1x for patch_embed: pixels "
    "need no gradient); encoder on the cls token + visible patches only, decoder on all tokens; matmuls and "
    "attention only (LayerNorm, GELU, softmax, gathers and the optimizer step not counted; the loss row is an "
    "elementwise estimate)"
)
MASK_TOKEN_NOTE = (
    "mask-token ratio = training FLOPs per image of the same model with its encoder run on all patches (mask "
    "tokens in the encoder) over the train GF total (encoder on the visible patches only): how much more "
    "pretraining would cost without MAE's skipping of the masked patches (the paper, Table 1c, reports "
    f"{PAPER_MODEL_RATIO}x for ViT-L/16 at 224 px, mask 0.75, 8-block 512-wide decoder)"
)


def in_paper_setting(r: FlopsReport) -> bool:
    """Whether ``r`` is the configuration the paper reports its FLOPs ratios for (:data:`PAPER_SETTING`)."""
    c = r.config
    here = {"model": r.model, "img_size": c.img_size, "mask_ratio": r.mask_ratio,
            "decoder_depth": c.decoder_depth, "decoder_embed_dim": c.decoder_embed_dim}
    return here == PAPER_SETTING


def paper_model_ratio(r: FlopsReport) -> Optional[float]:
    """The paper's mask-token training-FLOPs ratio for ``r``'s configuration, or None where it gives none."""
    return PAPER_MODEL_RATIO if in_paper_setting(r) else None


def format_report(r: FlopsReport) -> str:
    """A readable per-part table (GFLOPs per image) with the paper's comparison lines."""
    t, c = r.tokens, r.config
    train_total = r.total("training")
    lines = [
        f"{r.model}  img {c.img_size}px  patch {c.patch_size}  mask {r.mask_ratio:g}  "
        f"tokens: encoder {t['encoder']} (1+{t['visible']} of {t['patches']}), decoder {t['decoder']}  "
        f"norm_pix_loss={c.norm_pix_loss}",
        f"{'part':<20}{'fwd GF':>12}{'train GF':>12}{'share':>9}",
    ]
    for p in r.parts:
        note = "" if p.matmul else "  (elementwise, estimate)"
        lines.append(f"{p.name:<20}{p.forward / 1e9:>12.3f}{p.training / 1e9:>12.3f}"
                     f"{p.training / train_total:>8.1%}{note}")
    lines.append(f"{'total':<20}{r.total('forward') / 1e9:>12.3f}{train_total / 1e9:>12.3f}")
    enc_tr = r.group("encoder", "training") + r.group("patch_embed", "training")
    dec_tr = r.group("decoder", "training") + r.group("pred_head", "training")
    m = r.encoder_with_mask_tokens
    paper = paper_model_ratio(r)
    lines += [
        f"training per image: encoder {enc_tr / 1e9:.2f} GF, decoder {dec_tr / 1e9:.2f} GF "
        f"({dec_tr / (enc_tr + dec_tr):.1%} of the model)",
        f"parameters: encoder {r.params['encoder'] / 1e6:.1f}M, decoder {r.params['decoder'] / 1e6:.1f}M "
        f"(trainable; fixed sin-cos tables excluded)",
        f"encoder with mask tokens (all {t['patches']} patches): forward {m['encoder_forward'] / 1e9:.2f} GF = "
        f"{m['encoder_ratio']:.2f}x the visible-only encoder; mask-token ratio {m['model_ratio']:.2f}x"
        + (f" (paper: {paper}x for ViT-L)" if paper else ""),
        f"decoder vs encoder FLOPs per token: {r.decoder_vs_encoder_per_token:.1%}"
        + (" (paper: 9% for ViT-L)" if paper else ""),
    ]
    if r.counter_check:
        k = r.counter_check
        lines.append(
            f"FlopCounterMode (meta device): forward {k['forward_counter'] / 1e9:.3f} GF "
            f"(diff {k['forward_rel_diff']:.3%}), training {k['training_counter'] / 1e9:.3f} GF "
            f"(diff {k['training_rel_diff']:.3%}) vs the analytic matmul total"
        )
    return "\n".join(lines)


def format_legend() -> str:
    """The lines under the tables: what GF, train GF and the mask-token ratio are."""
    return "\n".join(["GF = 1e9 FLOPs per image, 2 FLOPs per multiply-add (fvcore-style counts are half).",
                      TRAIN_GF_NOTE + ".", MASK_TOKEN_NOTE + "."])


def report_dict(r: FlopsReport) -> dict:
    """``r.to_dict()`` plus the image size at the top level and the paper's mask-token ratio (None where it
    gives none), so that several --img-size reports compare without digging."""
    return {**r.to_dict(), "img_size": r.config.img_size, "paper_model_ratio": paper_model_ratio(r)}


def format_schedule(s: dict) -> str:
    """A progressive-resolution schedule's training FLOPs per image: each size's epochs and cost, the total, and
    the same run at the final size throughout."""
    lines = [f"{s['model']}: {s['start']} -> {s['final']} px in steps of {s['size_step']} px over the first "
             f"{s['grow_epochs']} of {s['epochs']} epochs, then {s['final']} px",
             f"{'epochs':>13}{'img px':>8}{'train GF/img':>14}"]
    for p in s["phases"]:
        lines.append(f"{p['first_epoch']:>6}-{p['end_epoch'] - 1:<6}{p['img_size']:>8}"
                     f"{p['train_flops_per_image'] / 1e9:>14.1f}")
    lines.append(f"whole schedule: {s['train_flops_per_image'] / 1e12:.1f} TFLOPs per image over the run = "
                 f"{s['fraction_of_fixed']:.1%} of {s['fixed_final_flops_per_image'] / 1e12:.1f} at {s['final']} px "
                 f"throughout (saves {1 - s['fraction_of_fixed']:.1%})")
    if "counted" in s:
        c = s["counted"]
        lines.append(f"counted by FlopCounterMode (matmuls, every size): {c['train_matmul_flops_per_image'] / 1e12:.1f} "
                     f"TFLOPs per image = {c['fraction_of_fixed']:.1%} of {c['fixed_final_matmul_flops_per_image'] / 1e12:.1f}"
                     f"; analytic and counted differ by at most {c['max_rel_diff']:.1e} at any size")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mae-flops", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", action="append", choices=sorted(MODELS),
                   help="model factory name; repeat for several (default: ViT-B, ViT-L, ViT-H)")
    p.add_argument("--img-size", type=int, action="append",
                   help=f"image side in pixels (a multiple of the patch); repeat for several, one table each "
                        f"(default: {DEFAULT_IMG_SIZE})")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed")
    p.add_argument("--decoder-embed-dim", type=int, default=None, help="decoder width (default: the model's)")
    p.add_argument("--decoder-depth", type=int, default=None, help="decoder blocks (default: the model's)")
    p.add_argument("--decoder-num-heads", type=int, default=None, help="decoder heads (default: the model's)")
    p.add_argument("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false",
                   help="raw-pixel target (changes only the loss estimate)")
    p.add_argument("--check", action="store_true",
                   help="also count with torch.utils.flop_counter.FlopCounterMode on the meta device")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--grow-from", type=int, default=None,
                   help="also cost a progressive-resolution schedule: the first epoch's image side, growing "
                        "linearly to --img-size over --grow-epochs, then --img-size to --epochs")
    p.add_argument("--grow-epochs", type=int, default=None, help="epochs over which the side grows (default: 60%% "
                   "of --epochs)")
    p.add_argument("--grow-step", type=int, default=0, help="sizes in between are multiples of this many px (0: two "
                   "patches), as mae-pretrain --grow-step")
    p.add_argument("--epochs", type=int, default=1600, help="pretraining epochs of the schedule")
    return p.parse_args(argv)


def model_kwargs(args: argparse.Namespace) -> dict:
    """The model options of the command line, but the image size (the decoder only where given)."""
    kwargs = {"norm_pix_loss": args.norm_pix_loss}
    for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    return kwargs


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    kwargs = model_kwargs(args)
    try:
        reports = [count_flops(name, args.mask_ratio, check=args.check, img_size=img, **kwargs)
                   for img in args.img_size or [DEFAULT_IMG_SIZE] for name in args.model or DEFAULT_MODELS]
    except ValueError as e:
        print(f"mae-flops: error: {e}", file=sys.stderr)
        return 2
    schedules = {}
    if args.grow_from is not None:
        try:
            for r in reports:
                plan = from_options(r.config.img_size, args.grow_from, args.grow_epochs, args.epochs,
                                    r.config.patch_size, args.grow_step)
                schedules[id(r)] = schedule_training_flops(r.model, plan, args.mask_ratio, args.check, **kwargs)
        except ValueError as e:
            print(f"mae-flops: error: --grow-from {args.grow_from}: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps([{**report_dict(r), **({"schedule": schedules[id(r)]} if id(r) in schedules else {})}
                          for r in reports], indent=2))
    else:
        print("\n\n".join(format_report(r) + ("\n" + format_schedule(schedules[id(r)]) if id(r) in schedules else "")
                          for r in reports))
        print("\n" + format_legend())
    return 0


if __name__ == "__main__":
    sys.exit(main())

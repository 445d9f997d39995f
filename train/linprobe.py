"""``mae-linprobe``: linear probing of a frozen MAE encoder (docs/semantics.md §8), two ways.

    mae-linprobe --model vit_large_patch16 --finetune mae_pretrain_vit_large.pth --data /imagenet
    torchrun --nproc_per_node 8 -m mae_fast.train.linprobe --model vit_base_patch16 --batch-size 2048 ...
    mae-linprobe --method logistic --model vit_base_patch16 --finetune mae.pth --data /small_dataset

``--method lars`` (default, the paper's protocol): the cls token (``--pool avg``: the mean of the patch
tokens) after the encoder's final norm -> BatchNorm1d(affine=False, eps 1e-6) -> Linear (trunc-normal
std 0.01); only that head trains, with LARS (momentum 0.9, no weight decay), lr = blr x batch / 256,
10 warmup epochs then cosine; RandomResizedCrop(``--crop-scale``, 1) + flip (``--no-augment``: none).
The loop is :func:`mae_fast.train.engine.loop.fit`. Far below the recipe's batch (16384) the lr is tiny and the
head barely moves: a one-line warning says so and how to reach the recipe.

``--method logistic`` (the feature probe): embed the training and evaluation images once with the frozen
encoder (the mean of the patch tokens unless ``--pool cls``; clean views, or ``--views K`` augmented views of
each training image; kept on the GPU while they fit there, else streamed from host memory), then fit a multinomial
logistic regression to convergence (:mod:`mae_fast.train.evaluation.logistic`) with its L2 penalty chosen on a
held-out part of the training images (``--holdout``). Deterministic for a seed; it is the same head
(BatchNorm + Linear) and is saved as such, so ``mae-linprobe --eval`` evaluates it too.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from mae_fast.checkpoint import save_checkpoint
from mae_fast.device import DistInfo
from mae_fast.errors import ConfigError

from .data.loaders import KINDS as LOADER_KINDS
from .engine.cli import opt, run_main
from .engine.loop import fit
from .evaluation.classifier import (ClassifierConfig, ClassifierJob, accuracy_text, create_classifier, eval_loader_for,
                                    evaluate_only, labelled_images, load_encoder, parse_classifier_config,
                                    seed_training, start_classifier)

log = logging.getLogger("mae_fast.train")

#: per-model linear-probe defaults (docs/semantics.md §8)
RECIPE: Dict[str, Dict[str, float]] = {
    "vit_tiny_patch8": dict(blr=0.1, epochs=90),
    "vit_base_patch16": dict(blr=0.1, epochs=90),
    "vit_large_patch16": dict(blr=0.1, epochs=50),
    "vit_huge_patch14": dict(blr=0.1, epochs=50),
}
RECIPE_BATCH = 16384  # the paper's effective batch for linear probing
#: the feature probe's default pooling: MAE's loss is on the patch predictions, and the encoder's cls token
#: reaches it only through the decoder's attention, so the patch tokens are what the pretraining shapes most
#: (measured on digits: README "Fine-tuning and linear probing"); --method lars keeps the paper's cls token
LOGISTIC_POOL = "avg"
PROBE_FILE = "probe.pth"  # the feature probe's head, in the run's checkpoints/ folder
LABELLED_LOADERS = tuple(k for k in LOADER_KINDS if k != "synthetic")  # synthetic images have no labels


@dataclass
class LinprobeConfig(ClassifierConfig):
    """mae-linprobe options: the official linear-probe recipe as defaults."""

    method: str = opt("lars (the paper's SGD probe) | logistic (logistic regression on frozen features, fitted "
                      "to convergence)", "lars", choices=["lars", "logistic"])
    pool: str = opt("features: cls (cls token after the final norm, official) | avg (mean of the patch tokens "
                    "after the final norm); --method logistic defaults to avg (MAE's loss is on the patch tokens); "
                    "--eval: the checkpoint's", "cls", choices=["cls", "avg"])
    batch_size: int = opt("images per process per micro-step (official: 16384 in all)", 512, min=1)
    warmup_epochs: float = opt("linear lr warmup, in epochs (set per iteration)", 10.0, min=0)
    min_lr: float = opt("lr at the end of the cosine", 0.0, min=0)
    weight_decay: float = opt("LARS weight decay", 0.0, min=0)
    loader: str = opt("training loader: " + " | ".join(LABELLED_LOADERS) + " (auto: GPU decoding when available)",
                      "auto", choices=list(LABELLED_LOADERS))
    augment: bool = opt("random resized crop + flip of the training images (--no-augment: the eval view)", True)
    crop_scale: float = opt("smallest area fraction of the random resized crop", 0.08, above=0, max=1)
    views: int = opt("logistic: augmented views embedded per training image (0: one clean view)", 0, min=0)
    holdout: float = opt("logistic: fraction of the training images held out to choose the L2 penalty", 0.2,
                         above=0, below=1)
    l2: Optional[float] = opt("logistic: L2 penalty (default: chosen on the held-out images from 1 down to 1e-5)",
                              min=0)
    max_iter: int = opt("logistic: L-BFGS iterations per fit at most", 5000, min=1)

    task: ClassVar[str] = "linprobe"
    identity: ClassVar[Tuple[str, ...]] = ("model", "img_size", "nb_classes", "pool")


def linear_head(in_features: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps 1e-6) -> Linear with trunc-normal(std 0.01) weight, zero bias."""
    from timm.layers import trunc_normal_

    fc = nn.Linear(in_features, num_classes)
    trunc_normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    return nn.Sequential(nn.BatchNorm1d(in_features, affine=False, eps=1e-6), fc)


def lars(head: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """timm Lars, momentum 0.9; the trust ratio on matrices only, as the official LARS (1-D: plain SGD)."""
    from timm.optim import Lars

    mats = [p for p in head.parameters() if p.requires_grad and p.ndim > 1]
    vecs = [p for p in head.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": mats, "always_adapt": True}, {"params": vecs, "always_adapt": False, "weight_decay": 0.0}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=0.9, weight_decay=weight_decay)


def probe_model(cfg: LinprobeConfig, info: DistInfo, device: torch.device) -> nn.Module:
    """The frozen encoder (MAE weights from --finetune) pooling as --pool, with a BatchNorm + Linear head."""
    global_pool = "token" if cfg.pool == "cls" else "avg"
    model = create_classifier(cfg.model, cfg.nb_classes, cfg.img_size, global_pool=global_pool, fc_norm=False)
    load_encoder(model, cfg, info)
    model.head = linear_head(model.head.in_features, cfg.nb_classes)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")
    return model.to(device)


def small_scale_warning(cfg: LinprobeConfig, eff_batch: int, steps_per_epoch: int, lr: float,
                        num_images: int) -> Optional[str]:
    """One line when the lr derived from --blr is far below the recipe's (effective batch far from 16384) and
    the head will barely move, saying how to reach the recipe; None when at (or near) the recipe or --lr is set."""
    recipe_lr = cfg.blr * RECIPE_BATCH / 256
    if cfg.lr is not None or eff_batch * 4 > RECIPE_BATCH:
        return None
    world_size = eff_batch // cfg.effective_batch
    accum = math.ceil(RECIPE_BATCH / (cfg.batch_size * world_size))
    if num_images >= RECIPE_BATCH:
        reach = f"reach batch {RECIPE_BATCH} with --accum-iter {accum} (or more processes / a larger --batch-size)"
    else:
        reach = f"the {num_images} training images are fewer than one recipe batch"
    return (f"effective batch {eff_batch} and {cfg.epochs} epochs of {steps_per_epoch} steps are far from the "
            f"recipe's {RECIPE_BATCH} and 90 epochs: lr = blr {cfg.blr:g} x {eff_batch} / 256 = {lr:.3g} "
            f"(recipe: {recipe_lr:g}) is tiny and the LARS head will barely move; {reach}, set --lr, or fit the "
            f"probe to convergence with --method logistic")


def build_task(cfg: LinprobeConfig, info: DistInfo, device: torch.device) -> ClassifierJob:
    """The LARS probe: frozen classifier, BatchNorm + Linear head, LARS, the probe's augmentation."""
    from .data.labelled import build_labelled_loader, eval_transform, require_labelled
    from .data.loaders import build_loader

    train_loader: Any = None

    def scan_train(source: str) -> Any:
        nonlocal train_loader
        require_labelled(source)
        train_loader = build_loader(source, kind=cfg.loader, batch_size=cfg.batch_size, img_size=cfg.img_size,
                                    seed=cfg.seed, rank=info.rank, world_size=info.world_size, device=device,
                                    strict=cfg.strict_data, num_workers=cfg.num_workers, with_labels=True,
                                    drop_last=True, scale=(cfg.crop_scale, 1.0))
        return train_loader.images

    augmented = cfg.augment and not cfg.eval
    train_images, eval_images = labelled_images(cfg, info, scan_train if augmented else None)
    eval_loader = eval_loader_for(eval_images, cfg, info, device)
    if not cfg.eval and not cfg.augment:
        train_loader = build_labelled_loader(train_images, eval_transform(cfg.img_size, cfg.crop_pct),
                                             cfg.batch_size, seed=cfg.seed, rank=info.rank,
                                             world_size=info.world_size, device=device, strict=cfg.strict_data,
                                             num_workers=cfg.num_workers, training=True)
    model = probe_model(cfg, info, device)
    seed_training(cfg.seed, info)
    eff_batch = cfg.effective_batch * info.world_size
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    if train_loader is not None and info.is_main:
        warning = small_scale_warning(cfg, eff_batch, len(train_loader) // cfg.accum_iter, base_lr,
                                      len(train_images))
        if warning:
            log.warning("mae-linprobe: %s", warning)
    return ClassifierJob("linprobe", cfg, model, lars(model.head, base_lr, cfg.weight_decay),
                         train_loader if train_loader is not None else eval_loader, eval_loader, nn.CrossEntropyLoss(),
                         base_lr, info, device, extra_summary={"method": "lars", "pool": cfg.pool})


# ---------------------------------------------------------------- --method logistic
def train_logistic(cfg: LinprobeConfig, info: DistInfo, device: torch.device) -> Dict[str, Any]:
    """The feature probe (see the module doc); writes config.json, eval.csv, summary.json and the head."""
    from mae_fast.compile import apply_compile

    from .data.labelled import eval_transform, probe_transform
    from .evaluation.features import FeatureExtractor, classifier_encoder
    from .evaluation.logistic import features_home, fit_probe, scores_of
    from .run_state import RunLog, clear_run, write_json

    if cfg.resume:
        raise ConfigError("--resume continues a --method lars run; the feature probe runs in one go (rerun it, "
                          "with --overwrite to replace it)")
    if cfg.views and not cfg.augment:
        raise ConfigError(f"--views {cfg.views} asks for augmented views but --no-augment turns augmentation off")
    out = Path(cfg.output_dir)
    t0 = time.perf_counter()
    train_images, eval_images = labelled_images(cfg, info)
    model = probe_model(cfg, info, device).eval()
    compiled = apply_compile(model, cfg.compile, device)
    encode = classifier_encoder(model)
    common = dict(batch_size=cfg.batch_size, info=info, device=device, num_workers=cfg.num_workers, seed=cfg.seed,
                  strict=cfg.strict_data)
    clean = eval_transform(cfg.img_size, cfg.crop_pct)
    train_tf = probe_transform(cfg.img_size, (cfg.crop_scale, 1.0)) if cfg.views else clean
    train_x, train_y, groups = [], [], []
    extractor = FeatureExtractor(train_images, train_tf, **common)
    home = device
    for view in range(max(1, cfg.views)):
        x, y, idx = extractor(model, encode, cfg.precision, view)
        if view == 0:
            nbytes = x.numel() * x.element_size() * max(1, cfg.views)
            home = features_home(nbytes, device)
            if home != device and info.is_main:
                log.info("feature probe: the training features (%.1f GB) stay in host memory and are streamed to "
                         "%s in chunks", nbytes / 1e9, device)
        x, y, idx = x.to(home), y.to(home), idx.to(home)
        train_x.append(x)
        train_y.append(y)
        groups.append(idx)
    extractor.close()
    evaluator = FeatureExtractor(eval_images, clean, **common)
    val_x, val_y, _ = evaluator(model, encode, cfg.precision)
    evaluator.close()
    t_features = time.perf_counter() - t0
    if info.is_main:
        log.info("feature probe in %s: %d training rows (%d images x %d view(s)), %d evaluation images, %d-d %s "
                 "features in %.1f s", out, sum(len(x) for x in train_x), len(train_images), max(1, cfg.views),
                 len(val_x), val_x.shape[1], cfg.pool, t_features)
    probe = fit_probe(torch.cat(train_x), torch.cat(train_y), torch.cat(groups), cfg.nb_classes, device, l2=cfg.l2,
                      holdout=cfg.holdout, seed=cfg.seed, max_iter=cfg.max_iter)
    metrics = scores_of(probe.logits(val_x), val_y)

    with torch.no_grad():  # the probe as the linear-probe head: BatchNorm (eval) statistics + Linear
        bn, fc = model.head[0], model.head[1]
        bn.running_mean.copy_(probe.standardizer.mean)
        bn.running_var.copy_(probe.standardizer.var)
        fc.weight.copy_(probe.weight)
        fc.bias.copy_(probe.bias)
    top5 = {"acc5": metrics["acc5"]} if "acc5" in metrics else {}  # none with 5 classes or fewer
    summary = {"task": "linprobe", "method": "logistic", "run_dir": str(out), "acc1": metrics["acc1"],
               **top5, "loss": metrics["loss"], "best_acc1": metrics["acc1"], "l2": probe.l2,
               "l2_search": probe.search, "iterations": probe.iterations, "converged": probe.converged,
               "pool": cfg.pool, "views": cfg.views, "train_images": len(train_images),
               "eval_images": int(val_x.shape[0]), "feature_dim": int(val_x.shape[1]), "world_size": info.world_size,
               "seconds_features": t_features, "seconds_total": time.perf_counter() - t0, "compile": compiled}
    if info.is_main:
        if cfg.overwrite:
            clear_run(out)
        runlog = RunLog(out, True, cfg.tensorboard)
        runlog.write_eval(0, 0.0, {"acc1": metrics["acc1"], **top5, "loss": metrics["loss"], "l2": probe.l2})
        runlog.close()
        ckpt = out / "checkpoints" / PROBE_FILE
        config = dataclasses.asdict(cfg)
        state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
        save_checkpoint({"model": state, "config": config, "task": "linprobe", "method": "logistic",
                         "l2": probe.l2, "step": 0}, ckpt)
        summary["last_checkpoint"] = str(ckpt)
        write_json(out / "config.json", config)
        write_json(out / "summary.json", summary)
        log.info("feature probe: %s on %d images (l2 %.3g, %d L-BFGS iterations); head saved to %s",
                 accuracy_text(metrics), val_x.shape[0], probe.l2, probe.iterations, ckpt)
    return summary


def train(cfg: LinprobeConfig) -> Dict[str, Any]:
    """--method lars: the one training loop (:func:`~mae_fast.train.engine.loop.fit`) of :func:`build_task`;
    --method logistic: :func:`train_logistic`; --eval: the ``--resume`` checkpoint evaluated."""
    info, device, out = start_classifier(cfg)
    if cfg.eval:
        return evaluate_only(cfg, build_task, info, device)
    if cfg.method == "logistic":
        return train_logistic(cfg, info, device)
    return fit(cfg, build_task(cfg, info, device), out)


def parse_config(argv: Optional[List[str]] = None) -> LinprobeConfig:
    """The options; --method logistic pools with avg unless --pool is given (see :data:`LOGISTIC_POOL`)."""
    cfg = parse_classifier_config(LinprobeConfig, "mae-linprobe", "Linear probing of a frozen MAE encoder (official "
                                  "recipe as defaults; docs/semantics.md §8).", argv, RECIPE)
    if cfg.method == "logistic" and "pool" not in cfg.explicit:
        cfg.pool = LOGISTIC_POOL
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    return run_main("mae-linprobe", lambda: parse_config(argv), train)


if __name__ == "__main__":
    sys.exit(main())

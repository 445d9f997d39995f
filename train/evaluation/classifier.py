"""Classification on top of an MAE encoder, shared by ``mae-finetune`` and ``mae-linprobe``: the common
options, the timm VisionTransformer classifier and how MAE weights load into it, the job the one training
loop runs for them (:class:`ClassifierJob`, trained by :func:`mae_fast.train.engine.loop.fit`), evaluation
(top-1/top-5) and ``--eval`` of a checkpoint that knows its own model, image size and classes.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mae_fast.checkpoint import check_compatible, encoder_state_dict, extract_state_dict, read_checkpoint
from mae_fast.compile import COMPILE_MODES
from mae_fast.device import DEVICE_CHOICES, PRECISION_DTYPES, DistInfo, autocast_for
from mae_fast.errors import CheckpointError, ConfigError
from mae_fast.pos_embed import resize_pos_embed

from ..data.loader_base import default_workers
from ..engine.cli import add_config_flags, dataclass_parser, load_yaml, opt
from ..engine.cli import parse_config as parse_dataclass_config
from ..engine.loop import Job, start
from ..engine.steps import StepPlan
from ..run_state import RunLog, find_resume_checkpoint

log = logging.getLogger("mae_fast.train")

#: encoder shapes (docs/semantics.md §6); ``vit_tiny_patch8`` is ``mae_vit_tiny_patch8``'s encoder (not timm's vit_tiny)
MODELS: Dict[str, Dict[str, int]] = {
    "vit_tiny_patch8": dict(patch_size=8, embed_dim=96, depth=4, num_heads=3),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


@dataclass
class ClassifierConfig:
    """Options shared by mae-finetune and mae-linprobe."""

    model: str = opt("encoder: " + " | ".join(MODELS) + " (--eval: the checkpoint's)", "vit_large_patch16",
                     choices=list(MODELS))
    finetune: str = opt("MAE checkpoint to start from (mae-fast or official; full or encoder-only)", "")
    data: str = opt("ImageFolder tree (one sub-folder per class), or a folder with train/ and val/ trees", "")
    eval_data: str = opt("evaluation ImageFolder tree (default: DATA/val, else DATA itself)", "")
    nb_classes: int = opt("number of classes (0: the number of class folders; --eval: the checkpoint's)", 0, min=0)
    img_size: int = opt("input resolution; pos_embed is resized to it (--eval: the checkpoint's)", 224, min=1)
    batch_size: int = opt("images per process per micro-step", 64, min=1)
    accum_iter: int = opt("micro-steps per optimizer step", 1, min=1)
    epochs: int = opt("training epochs (0: the recipe's for the model)", 0, min=0)
    warmup_epochs: float = opt("linear lr warmup, in epochs (set per iteration)", 5.0, min=0)
    blr: Optional[float] = opt("base lr: lr = blr * effective batch / 256 (default: the recipe's)", above=0)
    lr: Optional[float] = opt("absolute lr (overrides --blr)", above=0)
    min_lr: float = opt("lr at the end of the cosine", 1e-6, min=0)
    weight_decay: float = opt("weight decay (not on norms, biases, pos_embed, cls_token)", 0.05, min=0)
    crop_pct: Optional[float] = opt("eval center-crop fraction (default 224/256 up to 224 px, else 1.0)",
                                    above=0, max=1)
    precision: str = opt("bf16 (autocast) | fp16 (autocast, dynamic loss scaling) | fp32; a GradScaler steps in all "
                         "three: outside fp16 its scale stays 1 and it only skips non-finite updates", "bf16",
                         choices=[n for n in PRECISION_DTYPES if n != "fp64"])
    device: str = opt(" | ".join(DEVICE_CHOICES) + " (auto: cuda when visible)", "auto", choices=list(DEVICE_CHOICES))
    compile: str = opt("torch.compile: auto (per-block on CUDA, off on CPU) | off | blocks | model", "auto",
                       choices=list(COMPILE_MODES))
    seed: int = opt("seed of data order, augmentation and init", 0, min=0)
    num_workers: int = opt("data loader worker processes (default: the cores available, at most 8)",
                           default_workers(), min=0)
    strict_data: bool = opt("stop at the first unreadable image instead of skipping it", False)
    output_dir: str = opt("checkpoints and logs go here (default: a new runs/<command>[-N])", "")
    overwrite: bool = opt("replace the run already in --output-dir (its checkpoints and logs are deleted)", False)
    save_every: int = opt("checkpoint every N optimizer steps (and after every epoch)", 1000, min=1)
    keep_checkpoints: int = opt("keep the newest k checkpoints (0: keep all)", 3, min=0)
    resume: str = opt("'auto' (newest checkpoint in the run folder), a file, or '' (fresh)", "")
    eval: bool = opt("only evaluate the --resume checkpoint and report accuracy", False)
    log_every: int = opt("log loss and lr every N steps", 20, min=1)
    max_steps: int = opt("stop after this many optimizer steps (0: all epochs)", 0, min=0)
    tensorboard: bool = opt("write TensorBoard logs when tensorboard is installed", True)
    progress: bool = opt("show a tqdm progress bar on a terminal (else one line per --log-every steps)", True)

    #: the command's name: names the default run folder runs/<task>[-N] and is stored in checkpoints
    task: ClassVar[str] = "classify"
    #: options that describe the trained model: read from the checkpoint's config under --eval
    identity: ClassVar[Tuple[str, ...]] = ("model", "img_size", "nb_classes")
    #: the options given on the command line or in --config (set by :func:`parse_classifier_config`)
    explicit: ClassVar[FrozenSet[str]] = frozenset()

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_iter


def parse_classifier_config(cls: type, prog: str, description: str, argv: Optional[List[str]],
                            recipe: Dict[str, Dict[str, float]]) -> ClassifierConfig:
    """``cls`` from defaults < ``--config`` YAML < flags, range-checked, with the recipe filled in and the
    names of the options given explicitly kept in ``cfg.explicit``."""
    parser = dataclass_parser(cls, prog, description)
    add_config_flags(parser)
    cfg, args = parse_dataclass_config(cls, parser, argv)
    given = {f.name for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    if getattr(args, "config", None):
        given |= set(load_yaml(args.config, cls))
    cfg.explicit = frozenset(given)
    return apply_recipe(cfg, recipe)


def apply_recipe(cfg: ClassifierConfig, recipe: Dict[str, Dict[str, float]]) -> ClassifierConfig:
    """Fill the options left unset (None / 0 epochs) with the model's recipe values; check the rest."""
    for name, value in recipe[cfg.model].items():
        if hasattr(cfg, name) and getattr(cfg, name) in (None, 0):
            setattr(cfg, name, int(value) if name == "epochs" else value)
    if not cfg.data:
        raise ConfigError("--data is required (an ImageFolder tree: one sub-folder of images per class)")
    if cfg.eval and not cfg.resume:
        raise ConfigError("--eval needs --resume FILE (a trained checkpoint) or --resume auto")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run or replace it")
    if cfg.lr is not None and cfg.min_lr > cfg.lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    return cfg


def adopt_checkpoint_config(cfg: ClassifierConfig, state: Dict[str, Any], source: str) -> None:
    """Take the model-describing options (``cfg.identity``) from a trained checkpoint's config where the
    command line left them unset; ConfigError naming both values where it contradicts the checkpoint."""
    saved_task = state.get("task")
    if saved_task and saved_task != cfg.task:
        raise ConfigError(f"{source} is a {saved_task} checkpoint: evaluate it with mae-{saved_task} --eval")
    saved = state.get("config") or {}
    for name in cfg.identity:
        if name not in saved:
            continue
        value, flag = saved[name], "--" + name.replace("_", "-")
        if name in cfg.explicit:
            given = getattr(cfg, name)
            if given != value and not (name == "nb_classes" and given == 0):
                raise ConfigError(f"{flag} {given} contradicts the checkpoint's {value} ({source})")
        else:
            setattr(cfg, name, value)


# ---------------------------------------------------------------- model
def create_classifier(name: str, num_classes: int, img_size: int = 224, global_pool: str = "avg",
                      drop_path: float = 0.0, fc_norm: Optional[bool] = None) -> nn.Module:
    """timm VisionTransformer with an MAE encoder's shape. ``avg`` pooling uses fc_norm and no final norm
    (as the official models_vit) unless ``fc_norm=False`` (final norm on every token, then the mean);
    ``token`` keeps the final norm and classifies the cls token."""
    from timm.models.vision_transformer import VisionTransformer

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    patch = MODELS[name]["patch_size"]
    if img_size % patch:
        raise ValueError(f"--img-size {img_size} is not a multiple of {name}'s patch size {patch}")
    return VisionTransformer(img_size=img_size, num_classes=num_classes, global_pool=global_pool,
                             drop_path_rate=drop_path, mlp_ratio=4.0, qkv_bias=True, fc_norm=fc_norm,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **MODELS[name])


def load_pretrained(model: nn.Module, checkpoint: Any) -> List[str]:
    """Load an MAE checkpoint's encoder (path or dict; full, encoder-only or official) into a
    classifier from :func:`create_classifier`; returns the keys the checkpoint did not give.

    pos_embed is resized bicubically to the model's grid; the MAE ``norm`` is dropped when the model
    pools with fc_norm; a head of another shape is dropped. Raises CheckpointError naming the key and
    both shapes when the checkpoint is of another size, or the first encoder key it lacks.
    """
    source = "checkpoint" if isinstance(checkpoint, dict) else str(checkpoint)
    ckpt = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    sd = encoder_state_dict(extract_state_dict(ckpt, source))
    model_sd = model.state_dict()
    for key in [k for k in sd if k.startswith(("norm.", "head.", "fc_norm."))]:
        if key not in model_sd or sd[key].shape != model_sd[key].shape:
            del sd[key]  # MAE norm under fc_norm pooling (official), or another task's head
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape[-1] == model.pos_embed.shape[-1] and pos.shape != model.pos_embed.shape:
        old = pos.shape[1]
        sd["pos_embed"] = resize_pos_embed(pos, model.patch_embed.grid_size[0])
        log.info("pos_embed resized from %d to %d tokens", old, sd["pos_embed"].shape[1])
    missing = check_compatible(model_sd, sd, source)
    encoder_missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    if encoder_missing:
        raise CheckpointError(f"{source}: encoder key '{encoder_missing[0]}' is missing ({len(encoder_missing)} "
                              f"keys missing); the checkpoint is not an MAE encoder of this model")
    model.load_state_dict(sd, strict=False)
    return missing


def load_encoder(model: nn.Module, cfg: ClassifierConfig, info: DistInfo) -> None:
    """``--finetune``: the MAE encoder into ``model`` (not under --eval, where the checkpoint has it all)."""
    if cfg.finetune and not cfg.eval:
        missing = load_pretrained(model, cfg.finetune)
        if info.is_main:
            log.info("%s: loaded the encoder; new: %s", cfg.finetune, ", ".join(missing) or "nothing")


def load_trained(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Load a fine-tuned/linear-probe model state exactly, naming the key and shapes on a mismatch."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing = check_compatible(model.state_dict(), sd, source)
    if missing:
        raise CheckpointError(f"{source}: key '{missing[0]}' is missing ({len(missing)} keys missing); the "
                              f"checkpoint is of another model, pooling or task")
    model.load_state_dict(sd)


# ---------------------------------------------------------------- set-up
def seed_training(seed: int, info: DistInfo) -> None:
    """Per-rank seeds for what the step draws (drop path, mixup), as the official seed + rank."""
    import random

    import numpy as np

    torch.manual_seed(seed + info.rank)
    np.random.seed(seed + info.rank)
    random.seed(seed + info.rank)


def labelled_images(cfg: ClassifierConfig, info: DistInfo, scan_train: Optional[Callable[[str], Any]] = None
                    ) -> Tuple[Any, Any]:
    """(training, evaluation) ImageLists of ``--data`` / ``--eval-data`` (under --eval: both the evaluation
    images), with ``cfg.nb_classes`` set from the class folders when not given or known from the checkpoint.
    ``scan_train(source)``, if given, scans the training source (e.g. by building its loader)."""
    from ..data.labelled import check_classes, num_classes_of, scan_labelled, split_sources

    train_src, eval_src = split_sources(cfg.data, cfg.eval_data)
    eval_images = scan_labelled(eval_src, cfg.strict_data, info.rank, info.world_size)
    if cfg.eval:
        train_images = eval_images
    elif scan_train is not None:
        train_images = scan_train(train_src)
    else:
        train_images = eval_images if eval_src == train_src else scan_labelled(
            train_src, cfg.strict_data, info.rank, info.world_size)
    if not cfg.nb_classes:
        cfg.nb_classes = num_classes_of(train_images)
    check_classes(train_images, eval_images, cfg.nb_classes)
    return train_images, eval_images


def eval_loader_for(images: Any, cfg: ClassifierConfig, info: DistInfo, device: torch.device) -> Any:
    """The evaluation loader: every image once in file order, resize + center crop."""
    from ..data.labelled import build_labelled_loader, eval_transform

    return build_labelled_loader(images, eval_transform(cfg.img_size, cfg.crop_pct), cfg.batch_size, seed=cfg.seed,
                                 rank=info.rank, world_size=info.world_size, device=device, strict=cfg.strict_data,
                                 num_workers=cfg.num_workers, training=False)


# ---------------------------------------------------------------- evaluation
def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> List[torch.Tensor]:
    """Number of rows whose label is among the top-k scores, for each k (k capped at the classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, :min(k, logits.shape[1])].any(dim=1).sum() for k in ks]


#: top-5 is reported only above this many classes: with 5 or fewer every label is in the top 5 (always 100%)
TOP5_MAX_TRIVIAL_CLASSES = 5


def without_trivial_top5(metrics: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """``metrics`` without its top-5 entries (``acc5``, ``knn_acc5``) when there are 5 classes or fewer (the
    key is then absent from logs, eval.csv and summaries alike); unchanged otherwise."""
    if num_classes > TOP5_MAX_TRIVIAL_CLASSES:
        return metrics
    return {k: v for k, v in metrics.items() if not k.endswith("acc5")}


def accuracy_text(metrics: Dict[str, Any], prefix: str = "") -> str:
    """"top-1 12.34%, top-5 56.78%" from ``{prefix}acc1`` / ``{prefix}acc5``; just top-1 where top-5 is absent."""
    text = f"top-1 {metrics[prefix + 'acc1']:.2f}%"
    if prefix + "acc5" in metrics:
        text += f", top-5 {metrics[prefix + 'acc5']:.2f}%"
    return text


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, cfg: ClassifierConfig, device: torch.device,
             info: DistInfo) -> Dict[str, float]:
    """Top-1/top-5 and cross-entropy over every evaluation image (all ranks); no top-5 with 5 classes or fewer."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for imgs, labels in loader:
        with autocast_for(cfg.precision, device):
            out = model(imgs)
        out = out.float()
        hits1, hits5 = topk_hits(out, labels)
        stats += torch.stack([F.cross_entropy(out, labels, reduction="sum").double(), hits1.double(),
                              hits5.double(), torch.tensor(float(labels.shape[0]), dtype=torch.float64,
                                                           device=device)])
    if info.enabled:
        dist.all_reduce(stats)
    model.train(was_training)
    n = max(1.0, stats[3].item())
    return without_trivial_top5({"acc1": 100 * stats[1].item() / n, "acc5": 100 * stats[2].item() / n,
                                 "loss": stats[0].item() / n, "images": int(stats[3].item())}, cfg.nb_classes)


# ---------------------------------------------------------------- training
class ClassifierJob(Job):
    """Fine-tuning or linear probing as a :class:`~mae_fast.train.engine.loop.Job`: cross-entropy (after mixup)
    of the classifier's logits, top-1/top-5 after every epoch with the best kept, a checkpoint each epoch."""

    save_each_epoch = True

    def __init__(self, name: str, cfg: ClassifierConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 train_loader: Any, eval_loader: Any, criterion: nn.Module, base_lr: float, info: DistInfo,
                 device: torch.device, mixup: Optional[Callable] = None, clip_grad: Optional[float] = None,
                 extra_summary: Optional[Dict[str, Any]] = None):
        super().__init__(cfg, model, train_loader, base_lr, info, device)
        self.name, self.optimizer, self.eval_loader, self.criterion = name, optimizer, eval_loader, criterion
        self.mixup, self.clip_grad, self.extra_summary = mixup, clip_grad, extra_summary or {}
        self.best: Dict[str, Any] = {}
        self.metrics: Dict[str, Any] = {}

    def optimizer_for(self, wrapped: nn.Module) -> torch.optim.Optimizer:
        return self.optimizer

    def loss(self, batch: Any, step: int, micro: int) -> Tuple[torch.Tensor, int]:
        imgs, labels = batch
        targets = labels
        if self.mixup is not None:
            if imgs.shape[0] % 2:  # timm Mixup needs an even batch (an unreadable image was dropped)
                imgs, labels = imgs[:-1], labels[:-1]
            imgs, targets = self.mixup(imgs, labels)
        with autocast_for(self.cfg.precision, self.device):
            return self.criterion(self.wrapped(imgs), targets), imgs.shape[0]

    def check_resumable(self, state: Dict[str, Any], source: str) -> None:
        load_trained(self.model, state["model"], source)

    def resumed(self, state: Dict[str, Any]) -> None:
        self.best = dict(state.get("best") or {})

    def evaluate(self, step: int, plan: StepPlan, runlog: RunLog) -> None:
        if not plan.ends_epoch(step) and step != plan.total_steps:
            return
        self.metrics = metrics = evaluate(self.model, self.eval_loader, self.cfg, self.device, self.info)
        if metrics["acc1"] >= self.best.get("acc1", -1.0):
            self.best = {**{k: metrics[k] for k in ("acc1", "acc5") if k in metrics}, "step": step}
        logged = {k: metrics[k] for k in ("acc1", "acc5", "loss") if k in metrics}
        runlog.write_eval(step, plan.progress(step), logged)
        if self.info.is_main:
            log.info("epoch %d (step %d): %s on %d images (best top-1 %.2f%%)", math.ceil(plan.progress(step)),
                     step, accuracy_text(metrics), metrics["images"], self.best["acc1"])

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"best": self.best, "task": self.name}

    def summary(self) -> Dict[str, Any]:
        top5 = {"acc5": self.metrics["acc5"]} if "acc5" in self.metrics else {}  # none with 5 classes or fewer
        return {"task": self.name, "acc1": self.metrics.get("acc1"), **top5, "best_acc1": self.best.get("acc1"),
                **self.extra_summary}


# ---------------------------------------------------------------- command
Build = Callable[[Any, DistInfo, torch.device], ClassifierJob]


def start_classifier(cfg: ClassifierConfig) -> Tuple[DistInfo, torch.device, Path]:
    """:func:`~mae_fast.train.engine.loop.start` with the run folder ``runs/<task>[-N]``, kept in
    ``cfg.output_dir`` (``--eval --resume auto`` looks there)."""
    info, device, out = start(cfg, f"runs/{cfg.task}")
    cfg.output_dir = str(out)
    return info, device, out


def evaluate_only(cfg: ClassifierConfig, build: Build, info: DistInfo, device: torch.device) -> Dict[str, float]:
    """``--eval``: the ``--resume`` checkpoint's model options adopted into ``cfg``, the job built for them, the
    checkpoint's weights loaded exactly and evaluated (top-1 / top-5, no training)."""
    folder = Path(cfg.output_dir) / "checkpoints"
    found = find_resume_checkpoint(cfg.resume, folder)
    if found is None:
        raise FileNotFoundError(f"--resume auto: no checkpoint in {folder}")
    path, state = found
    adopt_checkpoint_config(cfg, state, str(path))
    job = build(cfg, info, device)
    load_trained(job.model, extract_state_dict(state, str(path)), str(path))
    metrics = evaluate(job.model, job.eval_loader, cfg, device, info)
    if info.is_main:
        log.info("%s: %s on %d images", path, accuracy_text(metrics), metrics["images"])
    return metrics

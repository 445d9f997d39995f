"""``mae-convert SRC DST``: mae-fast / official ``.pth`` <-> Hugging Face ViTMAE folder <-> timm encoder.

The format of each side follows from its path: a folder (or a path without a suffix, or ending in
``/``) is a Hugging Face ``ViTMAEForPreTraining`` folder (``ViTMAEModel`` with ``--encoder-only``),
``.safetensors`` a timm ``VisionTransformer`` encoder, ``.pth`` / ``.pt`` an mae-fast or official
checkpoint; a source folder holding a sharded (torch.distributed.checkpoint) training checkpoint is
consolidated into one file with the official keys. Nothing is dropped or made up silently: the command lists what it did not carry over and
why, and refuses to write a decoder it does not have.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import torch

from .checkpoint import (PathLike, StateDict, _summarize_keys, check_state_dict, encoder_state_dict, extract_state_dict,
                         is_decoder_key, is_sharded_checkpoint, read_checkpoint, save_checkpoint)

from .errors import CheckpointError, ConvertError
from .hf import (CONFIG_FILE, DEFAULT_MASK_RATIO, ENCODER, PRETRAINING, factory_name, read_hf_folder,
                 read_safetensors, safetensors_metadata, to_hf_state_dict, write_hf_folder, write_safetensors)
from .models_mae import MODEL_CONFIGS, OFFICIAL_NAMES, MAEConfig

PTH, HF, TIMM, SHARDED = "pth", "hf", "timm", "sharded"
KIND_NAMES = {PTH: "mae-fast/official .pth", HF: "Hugging Face folder", TIMM: "timm encoder .safetensors",
              SHARDED: "sharded (torch.distributed.checkpoint) training checkpoint folder"}
PTH_SUFFIXES = (".pth", ".pt")
#: safetensors metadata keys under which a timm file written here keeps the MAE config
META_CONFIG, META_MASK_RATIO = "mae_fast_config", "mask_ratio"
#: timm classifier weights that are not part of an MAE encoder
TIMM_CLASSIFIER_PREFIXES = ("head.", "fc_norm.", "head_drop.")



def path_kind(path: PathLike, role: str) -> str:
    """The format of SRC (``role="source"``, must exist) or DST from its path; ConvertError if unclear."""
    raw = str(path)
    p = Path(path)
    if role == "source" and not p.exists():
        raise ConvertError(f"{raw}: no such file or folder")
    if role == "source" and is_sharded_checkpoint(p):
        return SHARDED
    if p.is_dir() or raw.endswith(("/", "\\")) or (role != "source" and not p.exists() and p.suffix == ""):
        return HF
    if p.suffix == ".safetensors":
        return TIMM
    if p.suffix in PTH_SUFFIXES:
        return PTH
    raise ConvertError(
        f"{raw}: cannot tell the {role} format from its name (unknown direction): use a folder for Hugging "
        f"Face, .safetensors for a timm encoder, .pth for mae-fast/official")


@dataclass
class Portable:
    """A model read from any format: mae-fast weights, their shape and the MAE training settings."""

    state_dict: StateDict
    config: MAEConfig
    mask_ratio: float
    kind: str
    dropped: List[str] = field(default_factory=list)  # what reading left behind, and why
    notes: List[str] = field(default_factory=list)

    @property
    def decoder_keys(self) -> List[str]:
        return [k for k in self.state_dict if is_decoder_key(k)]


def _config_from_meta(meta: Mapping, sd: Mapping[str, torch.Tensor], model: Optional[str], source: str,
                      notes: List[str]) -> MAEConfig:
    """The model shape: ``--model``, else a full MAEConfig in ``meta`` (files written here), else the
    model ``meta`` names, else the one factory whose widths and depths match the tensors."""
    names = [f.name for f in fields(MAEConfig)]
    if model is None and all(n in meta for n in names):
        return MAEConfig(**{n: meta[n] for n in names})
    name = model or meta.get("model")
    if name is None:
        name = _match_factory(sd, source)
        notes.append(f"{source} does not name its model; its tensors match {name} (heads taken from it)")
    name = OFFICIAL_NAMES.get(name, name)
    if name not in MODEL_CONFIGS:
        raise ConvertError(f"{source}: model {name!r} is not an MAE model; pass --model "
                           f"({', '.join(sorted(MODEL_CONFIGS))})")
    kwargs = dict(MODEL_CONFIGS[name])
    patch = sd.get("patch_embed.proj.weight")
    pos = sd.get("pos_embed")
    if patch is not None and pos is not None and patch.dim() == 4 and pos.dim() == 3:
        kwargs["img_size"] = int(round((pos.shape[1] - 1) ** 0.5)) * patch.shape[-1]
        kwargs["in_chans"] = patch.shape[1]
    elif meta.get("img_size") or meta.get("input_size"):
        kwargs["img_size"] = int(meta.get("img_size") or meta.get("input_size"))
    return MAEConfig(**kwargs)


def _match_factory(sd: Mapping[str, torch.Tensor], source: str) -> str:
    """The factory whose encoder (and decoder, if present) widths, depths and patch size match ``sd``."""
    def depth(prefix: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})

    try:
        seen = dict(embed_dim=sd["cls_token"].shape[-1], depth=depth("blocks"),
                    patch_size=sd["patch_embed.proj.weight"].shape[-1])
    except KeyError as e:
        raise ConvertError(f"{source}: no {e.args[0]!r} tensor: not an MAE encoder") from None
    if "decoder_embed.weight" in sd:
        seen.update(decoder_embed_dim=sd["decoder_embed.weight"].shape[0], decoder_depth=depth("decoder_blocks"))
    hits = [n for n, kw in MODEL_CONFIGS.items() if all(getattr(MAEConfig(**kw), k) == v for k, v in seen.items())]
    if len(hits) != 1:
        found = ", ".join(f"{k}={v}" for k, v in seen.items())
        raise ConvertError(f"{source}: does not name its model and its shape ({found}) matches "
                           f"{'no' if not hits else 'more than one'} mae-fast model; pass --model")
    return hits[0]


def _settings(meta: Mapping, norm_pix_loss: Optional[bool], mask_ratio: Optional[float], source: str,
              notes: List[str]) -> tuple:
    """norm_pix_loss and mask_ratio: the flags, else what ``meta`` records, else the defaults (noted)."""
    if norm_pix_loss is None:
        norm_pix_loss = meta.get("norm_pix_loss")
        if norm_pix_loss is None:
            norm_pix_loss = False
            notes.append(f"{source} does not record norm_pix_loss: false assumed (pass --norm-pix-loss if "
                         f"the model was trained with it)")
    if mask_ratio is None:
        mask_ratio = meta.get("mask_ratio")
        if mask_ratio is None:
            mask_ratio = DEFAULT_MASK_RATIO
            notes.append(f"{source} does not record mask_ratio: {DEFAULT_MASK_RATIO} (the paper's) assumed")
    return bool(norm_pix_loss), float(mask_ratio)


def read_source(src: PathLike, model: Optional[str] = None, norm_pix_loss: Optional[bool] = None,
                mask_ratio: Optional[float] = None) -> Portable:
    """Read SRC of any format into mae-fast terms, checking every tensor against the model's shape."""
    source, kind = str(src), path_kind(src, "source")
    dropped: List[str] = []
    notes: List[str] = []
    if kind == HF:
        if model is not None:
            raise ConvertError(f"{source}: --model {model}: a Hugging Face folder's {CONFIG_FILE} gives the shape")
        hf = read_hf_folder(src)
        sd, cfg, notes = hf.state_dict, hf.config, hf.notes
        meta = {"norm_pix_loss": cfg.norm_pix_loss, "mask_ratio": hf.mask_ratio}
    else:
        if kind in (PTH, SHARDED):  # a sharded checkpoint is consolidated: read whole in this process
            ckpt = read_checkpoint(src)
            sd = extract_state_dict(ckpt, source)
            meta = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else (
                vars(ckpt["args"]) if hasattr(ckpt.get("args"), "__dict__") else {})
            rest = sorted(k for k in ckpt if k not in ("model", "config", "args"))
            if "model" in ckpt and rest:
                dropped.append(f"{', '.join(rest)}: training state, not model weights")
        else:
            sd = read_safetensors(src)
            raw = safetensors_metadata(src)
            meta = {**json.loads(raw.get(META_CONFIG, "{}")), **(
                {"mask_ratio": float(raw[META_MASK_RATIO])} if META_MASK_RATIO in raw else {})}
            head = [k for k in sd if k.startswith(TIMM_CLASSIFIER_PREFIXES)]
            if head:
                dropped.append(f"{_summarize_keys(head)} ({len(head)} tensors): a timm classifier's, an MAE has none")
                sd = {k: v for k, v in sd.items() if k not in head}
        cfg = _config_from_meta(meta, sd, model, source, notes)
    npl, ratio = _settings(meta, norm_pix_loss, mask_ratio, source, notes)
    if not 0.0 < ratio < 1.0:
        raise ConvertError(f"{source}: mask_ratio must be in (0, 1), got {ratio}")
    cfg = MAEConfig(**{**cfg.to_dict(), "norm_pix_loss": npl})
    sd = check_state_dict(sd, cfg, source)[0]
    return Portable(sd, cfg, ratio, kind, dropped, notes)


@dataclass
class ConversionReport:
    """What ``convert`` wrote and what it did not carry over (one line each, with the reason)."""

    src: str
    dst: str
    src_kind: str
    dst_kind: str
    tensors: int
    dropped: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        head = (f"{self.src} ({KIND_NAMES[self.src_kind]}) -> {self.dst} ({KIND_NAMES[self.dst_kind]}): "
                f"{self.tensors} tensors written")
        return ([head] + [f"  not carried over: {d}" for d in self.dropped]
                + [f"  note: {n}" for n in self.notes])


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists() and src.resolve() == dst.resolve():
        raise ConvertError(f"{dst}: source and destination are the same path")
    busy = dst.is_file() or (dst.is_dir() and any(dst.iterdir()))
    if busy and not overwrite:
        raise ConvertError(f"{dst}: exists; pass --overwrite to replace it")


def convert(src: PathLike, dst: PathLike, encoder_only: bool = False, model: Optional[str] = None,
            norm_pix_loss: Optional[bool] = None, mask_ratio: Optional[float] = None,
            overwrite: bool = False) -> ConversionReport:
    """Convert SRC to DST (formats from the paths, see the module doc) and report what was left out."""
    src_kind, dst_kind = path_kind(src, "source"), path_kind(dst, "destination")
    _check_destination(Path(src), Path(dst), overwrite)
    m = read_source(src, model, norm_pix_loss, mask_ratio)
    dropped, notes = list(m.dropped), list(m.notes)
    decoder = m.decoder_keys
    sd = m.state_dict
    settings = f"mask_ratio {m.mask_ratio:g}, norm_pix_loss {str(m.config.norm_pix_loss).lower()}"
    if dst_kind == TIMM:
        if decoder:
            dropped.append(f"decoder weights ({_summarize_keys(decoder)}; {len(decoder)} tensors): a timm "
                           f"VisionTransformer has no decoder")
        out = encoder_state_dict(sd)
        meta = {META_CONFIG: json.dumps(m.config.to_dict()), META_MASK_RATIO: repr(m.mask_ratio)}
        write_safetensors(dst, out, meta)
        notes.append("timm's VisionTransformer has no weights for head.* (an MAE has no classifier): load with "
                     "strict=False")
        notes.append(f"{settings} and the MAE shape kept in the file's metadata (timm does not use them)")
        count = len(out)
    elif dst_kind == HF:
        if not decoder and not encoder_only:
            raise ConvertError(f"{src}: encoder-only (no decoder weights), and a {PRETRAINING} folder needs them; "
                               f"pass --encoder-only to write a {ENCODER} folder")
        if encoder_only and decoder:
            dropped.append(f"decoder weights ({_summarize_keys(decoder)}; {len(decoder)} tensors): --encoder-only")
        write_hf_folder(dst, sd, m.config, m.mask_ratio, encoder_only)
        count = len(to_hf_state_dict(sd, encoder_only))
        notes.append(f"{settings} and the shape carried in {CONFIG_FILE}")
    else:
        if encoder_only:
            if decoder:
                dropped.append(f"decoder weights ({_summarize_keys(decoder)}; {len(decoder)} tensors): --encoder-only")
            sd = {k: v for k, v in sd.items() if not is_decoder_key(k)}
        config = {"model": factory_name(m.config), **m.config.to_dict(), "mask_ratio": m.mask_ratio,
                  "converted_from": str(src)}
        save_checkpoint({"model": sd, "config": config}, dst)
        notes.append(f"{settings} and the shape carried in the checkpoint's 'config'")
        count = len(sd)
    return ConversionReport(str(src), str(dst), src_kind, dst_kind, count, dropped, notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mae-convert", description=__doc__.split("\n")[0].split(": ", 1)[1],
        epilog="The format of each path follows from its name: a folder = Hugging Face, .safetensors = timm "
               "encoder, .pth = mae-fast/official.")
    p.add_argument("src", help="checkpoint to read: a .pth file, a Hugging Face folder or a timm .safetensors")
    p.add_argument("dst", help="what to write: a .pth file, a folder (Hugging Face) or a .safetensors (timm)")
    p.add_argument("--encoder-only", action="store_true",
                   help="leave the decoder out (.pth: like the released mae_pretrain_*.pth; folder: ViTMAEModel)")
    p.add_argument("--model", choices=sorted([*MODEL_CONFIGS, *OFFICIAL_NAMES]),
                   help="model shape (heads), if SRC does not say")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="the model's norm_pix_loss (default: what SRC records)")
    p.add_argument("--mask-ratio", type=float, default=None, help="mask ratio to record (default: what SRC records)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        report = convert(a.src, a.dst, a.encoder_only, a.model, a.norm_pix_loss, a.mask_ratio, a.overwrite)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"mae-convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

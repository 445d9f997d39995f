"""Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` folders <-> mae-fast state_dicts and configs.

Needs only ``safetensors`` and ``json``: transformers is used, when installed, just to write config.json
the way ``save_pretrained`` does. Weights are written under the Hub's key names (as in
``facebook/vit-mae-base``), which every transformers release loads; on reading, the names transformers
>= 5 uses in memory (``vit.layers.N.attention.q_proj``) and writes (``decoder_encoder.layer.N``) are
accepted too. Our fused qkv Linear (columns q|k|v) is split into query/key/value and concatenated back
exactly, so mae-fast -> HF -> mae-fast returns identical tensors.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .files import PathLike, StateDict, atomic_write, is_decoder_key
from .errors import CheckpointError
from .models_mae import LN_EPS, MODEL_CONFIGS, MAEConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
PRETRAINING = "ViTMAEForPreTraining"
ENCODER = "ViTMAEModel"
DEFAULT_MASK_RATIO = 0.75

# mae-fast key -> Hub key; the fused qkv is handled separately (QKV_PARTS)
_TOP = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
_BLOCK_PREFIX = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}
_IN_BLOCK = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
QKV_PARTS = ("query", "key", "value")  # our qkv rows, in order, are HF's query | key | value

# other spellings of the same weights -> Hub spelling (transformers >= 5 in memory and on save)
_RENAMES = [
    (re.compile(r"^vit\.layers\.(\d+)\."), r"vit.encoder.layer.\1."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\.(\d+)\."), r"decoder.decoder_layers.\1."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
]
_HUB_BLOCK_KEY = re.compile(r"^(vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$")


def _hub_block(prefix: str, index: str, inner: str, leaf: str) -> str:
    return f"{_BLOCK_PREFIX[prefix]}.{index}.{inner}.{leaf}"


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], encoder_only: bool = False) -> StateDict:
    """mae-fast tensors under Hub ``ViTMAEForPreTraining`` names (``ViTMAEModel`` names, no ``vit.``
    prefix and no decoder, with ``encoder_only``); qkv split into query/key/value. Tensors are copies."""
    out: StateDict = {}
    for key, t in sd.items():
        if encoder_only and is_decoder_key(key):
            continue
        if key in _TOP:
            out[_TOP[key]] = t.detach().clone()
            continue
        parts = key.split(".")
        if len(parts) < 4 or parts[0] not in _BLOCK_PREFIX or not parts[1].isdigit():
            raise CheckpointError(f"key '{key}' has no Hugging Face ViTMAE counterpart")
        inner, leaf = ".".join(parts[2:-1]), parts[-1]
        if inner == "attn.qkv":
            for name, chunk in zip(QKV_PARTS, t.detach().chunk(3, dim=0)):
                out[_hub_block(parts[0], parts[1], f"attention.attention.{name}", leaf)] = chunk.clone()
        elif inner in _IN_BLOCK:
            out[_hub_block(parts[0], parts[1], _IN_BLOCK[inner], leaf)] = t.detach().clone()
        else:
            raise CheckpointError(f"key '{key}' has no Hugging Face ViTMAE counterpart")
    if encoder_only:
        out = {k.removeprefix("vit."): v for k, v in out.items()}
    return out


def _hub_spelling(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    if key.startswith(("embeddings.", "encoder.layer.", "layernorm.", "layers.")):  # ViTMAEModel: no "vit."
        key = "vit." + key
        key = _RENAMES[0][0].sub(_RENAMES[0][1], key)
    return key


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> StateDict:
    """Hugging Face ViTMAE tensors (any of the names above) under mae-fast names; query/key/value
    concatenated into qkv. Raises CheckpointError naming the first key that has no mae-fast counterpart."""
    top = {hub: ours for ours, hub in _TOP.items()}
    block_prefix = {hub: ours for ours, hub in _BLOCK_PREFIX.items()}
    in_block = {hub: ours for ours, hub in _IN_BLOCK.items()}
    out: StateDict = {}
    qkv: Dict[Tuple[str, str, str], Dict[str, torch.Tensor]] = {}
    for raw_key, t in sd.items():
        key = _hub_spelling(raw_key)
        if key in top:
            out[top[key]] = t
            continue
        m = _HUB_BLOCK_KEY.match(key)
        inner = m.group(3) if m else ""
        if m and inner.startswith("attention.attention.") and inner.rsplit(".", 1)[-1] in QKV_PARTS:
            qkv.setdefault((block_prefix[m.group(1)], m.group(2), m.group(4)), {})[inner.rsplit(".", 1)[-1]] = t
        elif m and inner in in_block:
            out[f"{block_prefix[m.group(1)]}.{m.group(2)}.{in_block[inner]}.{m.group(4)}"] = t
        else:
            raise CheckpointError(f"{source}: key '{raw_key}' is not a ViTMAE weight mae-fast knows "
                                  f"(no mae-fast counterpart); the folder is not a ViTMAE model")
    for (prefix, index, leaf), parts in qkv.items():
        key = f"{prefix}.{index}.attn.qkv.{leaf}"
        absent = [p for p in QKV_PARTS if p not in parts]
        if absent:
            raise CheckpointError(f"{source}: {prefix} {index}: attention {leaf} has no {'/'.join(absent)} "
                                  f"tensor, so '{key}' cannot be assembled")
        shapes = {p: tuple(parts[p].shape) for p in QKV_PARTS}
        if len(set(shapes.values())) != 1:
            raise CheckpointError(f"{source}: {prefix} {index}: query/key/value {leaf} shapes differ {shapes}")
        out[key] = torch.cat([parts[p] for p in QKV_PARTS], dim=0)
    return out


def hf_config(cfg: MAEConfig, mask_ratio: float = DEFAULT_MASK_RATIO, encoder_only: bool = False) -> dict:
    """The ``ViTMAEConfig`` fields describing ``cfg`` (plus mask_ratio, which HF keeps in the config)."""
    return {
        "architectures": [ENCODER if encoder_only else PRETRAINING],
        "model_type": "vit_mae",
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio),
        "image_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "decoder_hidden_size": cfg.decoder_embed_dim,
        "decoder_num_hidden_layers": cfg.decoder_depth,
        "decoder_num_attention_heads": cfg.decoder_num_heads,
        "decoder_intermediate_size": int(cfg.decoder_embed_dim * cfg.mlp_ratio),
        "norm_pix_loss": cfg.norm_pix_loss,
        "mask_ratio": mask_ratio,
        "layer_norm_eps": LN_EPS,
        "hidden_act": "gelu",
        "qkv_bias": True,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    }


def _square(value, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{source}: {name} {list(value)} is not square; mae-fast models are square")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{source}: {name} must be a positive integer, got {value!r}")
    return value


def mae_config(hf: Mapping, source: str = CONFIG_FILE) -> Tuple[MAEConfig, float, List[str]]:
    """``ViTMAEConfig`` fields -> (MAEConfig, mask_ratio, notes on what mae-fast does not keep).

    Raises CheckpointError for a field that would change the function (activation, no qkv bias,
    different MLP ratios in encoder and decoder, missing or invalid sizes)."""
    if "model_type" not in hf:
        raise CheckpointError(f"{source}: no model_type, so not a Hugging Face config (an mae-fast run folder? "
                              f"pass one of its checkpoints/*.pth)")
    if hf["model_type"] != "vit_mae":
        raise CheckpointError(f"{source}: model_type is {hf['model_type']!r}, not 'vit_mae' (a ViTMAE config)")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                "patch_size", "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads",
                "decoder_intermediate_size")
    absent = [k for k in required if k not in hf]
    if absent:
        raise CheckpointError(f"{source}: missing field(s) {', '.join(absent)}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r}; mae-fast blocks use exact (erf) 'gelu'")
    if not hf.get("qkv_bias", True):
        raise CheckpointError(f"{source}: qkv_bias is false; mae-fast attention has a qkv bias")
    width, dec_width = _square(hf["hidden_size"], "hidden_size", source), _square(
        hf["decoder_hidden_size"], "decoder_hidden_size", source)
    mlp_ratio = hf["intermediate_size"] / width
    if int(dec_width * mlp_ratio) != hf["decoder_intermediate_size"] or int(width * mlp_ratio) != hf["intermediate_size"]:
        raise CheckpointError(
            f"{source}: intermediate_size {hf['intermediate_size']} / hidden_size {width} and "
            f"decoder_intermediate_size {hf['decoder_intermediate_size']} / decoder_hidden_size {dec_width} "
            f"differ; mae-fast uses one mlp_ratio for encoder and decoder")
    cfg = MAEConfig(
        img_size=_square(hf["image_size"], "image_size", source),
        patch_size=_square(hf["patch_size"], "patch_size", source),
        in_chans=_square(hf.get("num_channels", 3), "num_channels", source),
        embed_dim=width,
        depth=_square(hf["num_hidden_layers"], "num_hidden_layers", source),
        num_heads=_square(hf["num_attention_heads"], "num_attention_heads", source),
        decoder_embed_dim=dec_width,
        decoder_depth=_square(hf["decoder_num_hidden_layers"], "decoder_num_hidden_layers", source),
        decoder_num_heads=_square(hf["decoder_num_attention_heads"], "decoder_num_attention_heads", source),
        mlp_ratio=mlp_ratio,
        norm_pix_loss=bool(hf.get("norm_pix_loss", False)),
    )
    mask_ratio = float(hf.get("mask_ratio", DEFAULT_MASK_RATIO))
    notes = []
    eps = hf.get("layer_norm_eps", 1e-12)
    if eps != LN_EPS:
        notes.append(f"layer_norm_eps {eps:g} not carried over: mae-fast LayerNorms use {LN_EPS:g}, the official "
                     f"MAE value (outputs differ slightly from this HF model's)")
    for drop in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hf.get(drop, 0.0):
            notes.append(f"{drop} {hf[drop]:g} not carried over: mae-fast pretraining has no dropout")
    return cfg, mask_ratio, notes


def factory_name(cfg: MAEConfig) -> Optional[str]:
    """The ``MODEL_CONFIGS`` name whose shape is ``cfg`` (any img_size), or None."""
    shape = {f.name: getattr(cfg, f.name) for f in fields(MAEConfig) if f.name not in ("img_size", "norm_pix_loss")}
    for name, kwargs in MODEL_CONFIGS.items():
        ref = MAEConfig(**kwargs)
        if all(getattr(ref, k) == v for k, v in shape.items()):
            return name
    return None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(obj).__name__}, expected an object")
    return obj


def read_safetensors(path: PathLike) -> StateDict:
    """All tensors of a .safetensors file; CheckpointError naming the file if it is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e}); "
                              f"the file is truncated or corrupt") from e


def safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The string metadata of a .safetensors file (empty if it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def write_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict] = None) -> Path:
    """Write ``tensors`` (contiguous copies) to a .safetensors file atomically."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt", **(metadata or {})})
    return atomic_write(path, lambda f: f.write(data))


def _read_weights(folder: Path) -> StateDict:
    if (folder / WEIGHTS_FILE).is_file():
        return read_safetensors(folder / WEIGHTS_FILE)
    if (folder / WEIGHTS_INDEX).is_file():
        index = _read_json(folder / WEIGHTS_INDEX).get("weight_map", {})
        sd: StateDict = {}
        for shard in sorted(set(index.values())):
            sd.update(read_safetensors(folder / shard))
        return sd
    if (folder / BIN_FILE).is_file():
        try:
            return torch.load(folder / BIN_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt / truncated files
            raise CheckpointError(f"{folder / BIN_FILE}: cannot be read ({type(e).__name__}); the file is "
                                  f"truncated or corrupt") from e
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX} or {BIN_FILE}) in the folder")


@dataclass
class HFCheckpoint:
    """A Hugging Face ViTMAE folder read into mae-fast terms."""

    state_dict: StateDict
    config: MAEConfig
    mask_ratio: float
    notes: List[str] = field(default_factory=list)
    encoder_only: bool = False


def read_hf_folder(folder: PathLike) -> HFCheckpoint:
    """Read config.json + weights of a ViTMAEForPreTraining (or encoder-only ViTMAEModel) folder and
    (the caller checks the tensors against the config: mae_fast.checkpoint.check_state_dict)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a Hugging Face model is a folder with {CONFIG_FILE} "
                              f"and {WEIGHTS_FILE})")
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} in the folder (a Hugging Face model folder holds "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg, mask_ratio, notes = mae_config(_read_json(folder / CONFIG_FILE), str(folder / CONFIG_FILE))
    sd = from_hf_state_dict(_read_weights(folder), str(folder))
    return HFCheckpoint(sd, cfg, mask_ratio, notes, encoder_only=not any(is_decoder_key(k) for k in sd))


def write_hf_folder(folder: PathLike, sd: Mapping[str, torch.Tensor], cfg: MAEConfig,
                    mask_ratio: float = DEFAULT_MASK_RATIO, encoder_only: bool = False) -> Path:
    """Write ``sd`` as a Hugging Face folder (config.json + model.safetensors) that
    ``ViTMAEForPreTraining.from_pretrained`` (``ViTMAEModel`` with ``encoder_only``) loads offline."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg, mask_ratio, encoder_only)
    write_safetensors(folder / WEIGHTS_FILE, to_hf_state_dict(sd, encoder_only))
    try:
        from transformers import ViTMAEConfig
    except ImportError:  # same fields, plain JSON
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    else:  # as save_pretrained writes it
        text = ViTMAEConfig(**config).to_json_string()
    atomic_write(folder / CONFIG_FILE, lambda f: f.write(text.encode()))
    return folder

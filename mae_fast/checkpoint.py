"""Official-format checkpoints: load them with clear errors, save them atomically, export to timm.
Hugging Face ViTMAE folders and timm ``.safetensors`` encoders are read too (``mae_fast.hf``).

An official checkpoint file is a dict whose ``"model"`` entry is the state_dict (docs/semantics.md §7);
the released ``mae_pretrain_vit_*.pth`` files hold the encoder only.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .files import PathLike, StateDict, atomic_write, is_decoder_key
from .errors import CheckpointError
from .pos_embed import resize_pos_embed

if TYPE_CHECKING:
    from .models_mae import MAEConfig

log = logging.getLogger(__name__)

def read_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict:
    """Read a checkpoint as a dict holding ``"model"`` (mae-fast keys): a ``.pth`` file (``torch.load``
    with weights_only, allowing the argparse Namespace official files hold), a Hugging Face ViTMAE folder
    (config.json + model.safetensors; its shape, mask_ratio and norm_pix_loss under ``"config"``) or a
    timm-keyed encoder ``.safetensors`` file.

    Raises CheckpointError naming the file when it is missing, empty, truncated or not a checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        return read_sharded(path) if is_sharded_checkpoint(path) else _read_hf_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from .hf import read_safetensors

        return {"model": read_safetensors(path)}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/truncated/pickled files
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the file is truncated, corrupt, or not a PyTorch checkpoint"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(obj).__name__}, expected a dict")
    return obj


def _read_hf_checkpoint(folder: Path) -> dict:
    """A Hugging Face ViTMAE folder as a checkpoint dict; notes on fields mae-fast does not keep are logged."""
    from .hf import factory_name, read_hf_folder

    hf = read_hf_folder(folder)
    for note in hf.notes:
        log.warning("%s: %s", folder, note)
    config = {"model": factory_name(hf.config), **hf.config.to_dict(), "mask_ratio": hf.mask_ratio}
    return {"model": check_state_dict(hf.state_dict, hf.config, str(folder))[0], "config": config}


def extract_state_dict(ckpt: Mapping, source: str = "checkpoint") -> StateDict:
    """The model weights of a checkpoint dict: its ``"model"`` entry, or the dict itself if it is one."""
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        sd = ckpt["model"]
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt
    else:
        raise CheckpointError(
            f"{source}: no 'model' key and not a state_dict (top-level keys: {sorted(ckpt)[:10]})"
        )
    return {k.removeprefix("module."): v for k, v in sd.items()}


@dataclass
class LoadReport:
    """What ``load_mae_checkpoint`` did: which keys were loaded and which the file lacked."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing_decoder: List[str] = field(default_factory=list)

    @property
    def encoder_only(self) -> bool:
        return bool(self.missing_decoder)

    def summary(self) -> str:
        if not self.missing_decoder:
            return f"{self.source}: loaded all {len(self.loaded)} tensors"
        return (
            f"{self.source}: encoder-only checkpoint: loaded {len(self.loaded)} encoder tensors; "
            f"{len(self.missing_decoder)} decoder tensors missing "
            f"({_summarize_keys(self.missing_decoder)}) keep their initialization"
        )


def _summarize_keys(keys: List[str]) -> str:
    """Collapse 'decoder_blocks.3.attn.qkv.weight'-style keys to 'decoder_blocks.0-7.*'."""
    groups: Dict[str, set] = {}
    plain: List[str] = []
    for k in keys:
        parts = k.split(".")
        if len(parts) > 2 and parts[1].isdigit():
            groups.setdefault(parts[0], set()).add(int(parts[1]))
        else:
            top = parts[0] + (".*" if len(parts) > 1 else "")
            if top not in plain:
                plain.append(top)
    for name, idx in groups.items():
        plain.append(f"{name}.{min(idx)}-{max(idx)}.*" if len(idx) > 1 else f"{name}.{min(idx)}.*")
    return ", ".join(plain)


def check_compatible(model_sd: Mapping[str, torch.Tensor], ckpt_sd: Mapping[str, torch.Tensor], source: str) -> List[str]:
    """Raise CheckpointError on the first unexpected key or shape mismatch; return the missing keys.

    Keys are checked in the model's order so the error names the first mismatching key.
    """
    for key, ref in model_sd.items():
        if key in ckpt_sd and tuple(ckpt_sd[key].shape) != tuple(ref.shape):
            hint = ""
            if key in ("pos_embed", "decoder_pos_embed"):
                hint = " (another img_size or patch size? build the model to match, or resize with mae_fast.pos_embed.resize_pos_embed)"
            raise CheckpointError(
                f"{source}: key '{key}' has shape {tuple(ckpt_sd[key].shape)} in the checkpoint but "
                f"{tuple(ref.shape)} in the model: the checkpoint is of another model or size{hint}"
            )
    unexpected = [k for k in ckpt_sd if k not in model_sd]
    if unexpected:
        raise CheckpointError(
            f"{source}: key '{unexpected[0]}' is not in this model ({len(unexpected)} unexpected keys: "
            f"{_summarize_keys(unexpected)}); the checkpoint is of another model"
        )
    return [k for k in model_sd if k not in ckpt_sd]


def check_mae_keys(model_sd: Mapping[str, torch.Tensor], ckpt_sd: Mapping[str, torch.Tensor], source: str) -> List[str]:
    """``check_compatible``, and also CheckpointError if an encoder key is missing; returns the
    missing (decoder) keys: an encoder-only checkpoint passes."""
    missing = check_compatible(model_sd, ckpt_sd, source)
    missing_encoder = [k for k in missing if not is_decoder_key(k)]
    if missing_encoder:
        raise CheckpointError(
            f"{source}: encoder key '{missing_encoder[0]}' is missing ({len(missing_encoder)} encoder keys "
            f"missing: {_summarize_keys(missing_encoder)}); the checkpoint is not an MAE encoder of this size"
        )
    return missing


def check_state_dict(sd: Mapping[str, torch.Tensor], config: "MAEConfig", source: str) -> Tuple[StateDict, List[str]]:
    """Check ``sd`` (mae-fast keys) against the model ``config`` describes, built on the meta device (no
    memory): returns ``sd`` in the model's key order and the missing decoder keys; raises
    CheckpointError naming key and shapes."""
    from .models_mae import MaskedAutoencoderViT

    try:
        with torch.device("meta"):
            model = MaskedAutoencoderViT(**config.to_dict())
    except ValueError as e:
        raise CheckpointError(f"{source}: the model it describes cannot be built: {e}") from e
    model_sd = model.state_dict()
    missing = check_mae_keys(model_sd, sd, source)
    return {k: sd[k] for k in model_sd if k in sd}, missing


def load_mae_checkpoint(
    model: nn.Module, checkpoint: Union[PathLike, Mapping], map_location: Union[str, torch.device] = "cpu"
) -> LoadReport:
    """Load an mae-fast or official MAE checkpoint (file path or dict) into ``model``.

    Full checkpoints load exactly; encoder-only ones load the encoder and log one line listing the
    missing decoder keys. Anything else raises CheckpointError naming the first bad key and shapes.
    """
    if isinstance(checkpoint, Mapping):
        source, ckpt = "checkpoint", checkpoint
    else:
        source, ckpt = str(checkpoint), read_checkpoint(checkpoint, map_location)
    ckpt_sd = extract_state_dict(ckpt, source)
    missing = check_mae_keys(model.state_dict(), ckpt_sd, source)
    model.load_state_dict(ckpt_sd, strict=False)
    report = LoadReport(source, loaded=list(ckpt_sd), missing_decoder=missing)
    if report.encoder_only:
        log.warning(report.summary())
    return report


def encoder_state_dict(model_or_sd: Union[nn.Module, Mapping], img_size: Optional[int] = None) -> StateDict:
    """The encoder weights under timm ``VisionTransformer`` key names (decoder dropped).

    timm's ``vit_base_patch16_224`` / ``vit_large_patch16_224`` / ``vit_huge_patch14_224`` load the
    result with only ``head.*`` missing. With ``img_size`` the position table is resized for it.
    """
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else extract_state_dict(model_or_sd)
    enc = {k: v.detach().clone() for k, v in sd.items() if not is_decoder_key(k)}
    if img_size is not None:
        patch = enc["patch_embed.proj.weight"].shape[-1]
        if img_size % patch:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch}")
        enc["pos_embed"] = resize_pos_embed(enc["pos_embed"], img_size // patch)
    return enc


def save_checkpoint(obj: dict, path: PathLike) -> Path:
    """Write ``obj`` with torch.save atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------ sharded (torch.distributed.checkpoint)
#: a sharded checkpoint is a folder of DCP files (``.metadata`` + one ``__<rank>_0.distcp`` per rank) and the
#: run state (step, loader position, RNG states, config) in ``run_state.pt``
SHARDED_METADATA = ".metadata"
RUN_STATE = "run_state.pt"


def is_sharded_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a sharded (DCP) checkpoint folder: it holds a ``.metadata`` file."""
    return (Path(path) / SHARDED_METADATA).is_file()


@contextlib.contextmanager
def dcp_errors(path: PathLike) -> Iterator[None]:
    """torch.distributed.checkpoint failures (raised on every rank) as one CheckpointError naming the folder."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # one process without a group is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except (CheckpointException, OSError, RuntimeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path}: cannot be read or written ({type(e).__name__}: "
                              f"{first[:300]}); a shard file is truncated, corrupt or missing, or the disk "
                              f"is full") from e


def read_sharded(path: PathLike) -> dict:
    """A sharded checkpoint as one in-memory dict, as a full checkpoint file holds it: ``model`` (official
    keys, full tensors), ``optimizer`` and the run state; read in one process, without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # as dcp_to_torch_save

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"checkpoint {path}: not a sharded checkpoint folder (no {SHARDED_METADATA} file)")
    state: dict = {}
    with dcp_errors(path):
        _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    out = {"model": {k.removeprefix("module."): v for k, v in state["model"].items()},
           "optimizer": state.get("optimizer", {})}
    run_state = path / RUN_STATE
    if run_state.is_file():
        out.update(read_checkpoint(run_state))
    return out

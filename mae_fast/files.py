"""What every checkpoint format shares (mae-fast / official ``.pth``, Hugging Face folders, timm
``.safetensors``, sharded folders): the state-dict types, the one error they raise, which keys are the
decoder's, and atomic file writes."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

#: state_dict prefixes that belong to the decoder (everything else is the encoder)
DECODER_PREFIXES = ("mask_token", "decoder_")



def is_decoder_key(key: str) -> bool:
    return key.startswith(DECODER_PREFIXES)


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Create ``path`` by calling ``write`` on a temp file in the same folder, fsync, rename.

    A crash mid-write leaves the previous file untouched, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(folder: PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable (fsync of the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def strict_json(obj: Any, indent: Optional[int] = 2) -> str:
    """JSON with NaN / Infinity written as null (strict JSON, which every reader accepts)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=indent, allow_nan=False, default=str)

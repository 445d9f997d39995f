"""MAE pretraining augmentation: RandomResizedCrop(scale=(0.2, 1), bicubic) + horizontal flip +
ImageNet normalization, with crop and flip drawn from (seed, epoch, file index) so that every loader
(PIL workers, DALI, nvJPEG) gives the same crops for the same sample, whatever the sharding or resume
point. The crop-and-resize is done on PIL images (:func:`augment_pil`) or on decoded tensors on any
device (:func:`resized_crops`)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SCALE: tuple[float, float] = (0.2, 1.0)
RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_N_DRAWS = 23  # 10 attempts x (area, ratio) + top + left + flip


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, index: np.ndarray, n: int = _N_DRAWS) -> np.ndarray:
    """Counter-based U[0, 1) draws (len(index), n) from (seed, epoch, index): no state to carry."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)
        key = _mix(key ^ np.array([epoch & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        base = _mix(key ^ _mix(np.asarray(index, dtype=np.uint64) + _GOLDEN))
        ctr = base[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _GOLDEN
        return (_mix(ctr) >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def sample_params_batch(widths: np.ndarray, heights: np.ndarray, seed: int, epoch: int,
                        index: np.ndarray, scale: tuple[float, float] = SCALE,
                        ratio: tuple[float, float] = RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes (n, 4) as (top, left, h, w) and flips (n,) for samples ``index`` of ``epoch``.

    torchvision's RandomResizedCrop.get_params (10 tries of area ~ U(scale) * image area and
    log-uniform aspect ratio, else a central crop), vectorized over samples with counter-based draws.
    """
    W = np.asarray(widths, dtype=np.float64)[:, None]
    H = np.asarray(heights, dtype=np.float64)[:, None]
    u = sample_uniforms(seed, epoch, np.asarray(index).reshape(-1))
    target = W * H * (scale[0] + (scale[1] - scale[0]) * u[:, 0:10])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lr0 + (lr1 - lr0) * u[:, 10:20])
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.argmax(axis=1)
    rows = np.arange(len(u))
    w, h = w[rows, first], h[rows, first]
    W, H = W[:, 0], H[:, 0]
    found = ok.any(axis=1)
    if not found.all():  # fallback: central crop, ratio clamped to the allowed range
        in_ratio = W / H
        fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.rint(H * ratio[1]), W))
        fh = np.where(in_ratio < ratio[0], np.rint(W / ratio[0]), H)
        w, h = np.where(found, w, np.maximum(fw, 1)), np.where(found, h, np.maximum(fh, 1))
    top = np.where(found, np.floor(u[:, 20] * (H - h + 1)), (H - h) // 2)
    left = np.where(found, np.floor(u[:, 21] * (W - w + 1)), (W - w) // 2)
    boxes = np.stack([top, left, h, w], axis=1).astype(np.int64)
    return boxes, u[:, 22] < 0.5


def sample_params(width: int, height: int, seed: int, epoch: int, index: int,
                  scale: tuple[float, float] = SCALE) -> tuple[tuple[int, int, int, int], bool]:
    """(crop box (top, left, h, w), flip) for one sample: :func:`sample_params_batch` of one."""
    boxes, flips = sample_params_batch(np.array([width]), np.array([height]), seed, epoch,
                                       np.array([index]), scale)
    return tuple(int(v) for v in boxes[0]), bool(flips[0])  # type: ignore[return-value]


def load_rgb(path: str) -> Image.Image:
    """Decode with Pillow and convert any mode (L, CMYK, RGBA, P, ...) to 3-channel RGB."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "RGB":
            return im
        if im.mode.startswith("I"):  # 16/32-bit grayscale: scale to 8 bits instead of clipping
            arr = np.asarray(im).astype(np.float64)
            arr = arr / 257.0 if arr.max() > 255 else arr
            im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
        elif im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # Pillow wants palette transparency expanded first
        return im.convert("RGB")  # L, LA, CMYK, RGBA (alpha dropped, as torchvision does), ...


def load_rgb_or_reason(path: str, strict: bool) -> tuple[Image.Image | None, str | None]:
    """(image, None), or (None, "path: why") for an unreadable file; with ``strict`` raise instead."""
    from mae_fast.errors import STRICT_DATA_HINT, UnreadableImageError

    try:
        return load_rgb(path), None
    except Exception as e:  # noqa: BLE001 - any decode failure is reported, never silent
        if strict:
            raise UnreadableImageError(f"unreadable image {path!r}: {e} ({STRICT_DATA_HINT})") from e
        return None, f"{path}: {e}"


def augment_pil(img: Image.Image, size: int, box: tuple[int, int, int, int], flip: bool
                ) -> torch.Tensor:
    """Crop ``box``, bicubic-resize to size x size, maybe flip; returns uint8 (3, size, size)."""
    top, left, h, w = box
    img = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC)
    if flip:
        img = TF.hflip(img)
    return TF.pil_to_tensor(img)


def resized_crops(images: Sequence[torch.Tensor], size: int, boxes: np.ndarray, flips: np.ndarray
                  ) -> torch.Tensor:
    """Tensor twin of :func:`augment_pil` for a batch: crop ``boxes[i]`` (top, left, h, w) of uint8
    (3, H, W) ``images[i]``, bicubic-resize with antialias to size x size in float32 (the computation
    of torchvision.transforms.v2.functional.resize(antialias=True, BICUBIC) on float tensors, called
    without its per-call checks), flip where ``flips[i]``; returns float32 (N, 3, size, size) on the
    images' device, clamped to [0, 255] and rounded as PIL's uint8 output is. PIL also rounds and
    clips between its two resize passes, so values differ from it by up to ~10 levels at saturated
    edges and by well under one level on average (tests/test_nvjpeg.py)."""
    out = [torch.nn.functional.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(size, size),
                                           mode="bicubic", antialias=True, align_corners=False)
           for img, (top, left, h, w) in zip(images, np.asarray(boxes).tolist())]
    x = torch.cat(out).clamp_(0, 255).round_()
    flip = torch.from_numpy(np.asarray(flips, dtype=bool)).to(x.device, non_blocking=True)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> ImageNet-normalized ``dtype`` (computed in float32 on x's device)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255.0)
    return ((x.float() - mean) * inv_std).to(dtype)

"""GPU JPEG decoding with nothing beyond torch and torchvision: files read by a thread pool, a batch
decoded at once by ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA, libjpeg-turbo
on the CPU: the decode device is a parameter, so tests run this same code on the CPU), then crop,
bicubic resize, flip and normalization on that device, with the crops of every other loader for the
same seed (:func:`mae_fast.train.data.transforms.sample_params_batch`). The next batch is prepared by a
background thread on a side CUDA stream while the current one trains
(:func:`mae_fast.train.data.loader_base.prefetched`).

Grayscale JPEGs are expanded to RGB by the decoder (``ImageReadMode.RGB``); 4-channel (CMYK, YCCK)
JPEGs are decoded by torchvision on the CPU, whose conversion equals Pillow's; files that are no
JPEG (PNG bytes named .jpg, say) or that the decoder refuses take the Pillow path for that file
(:func:`mae_fast.train.data.transforms.load_rgb`), and one that Pillow cannot read either is skipped with a
warning (or, with ``strict``, stops the run naming it).
"""
from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from .loader_base import Loader, prefetched
from .sources import ImageList
from .transforms import SCALE, load_rgb_or_reason, normalize, resized_crops, sample_params_batch

log = logging.getLogger("mae_fast.data")

# start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT/JPG/DAC
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROBLEMS: dict[str, str | None] = {}


def jpeg_components(data: bytes | bytearray) -> int:
    """Colour components of a JPEG from its frame header (1 gray, 3 YCbCr/RGB, 4 CMYK/YCCK); 0 for
    bytes that are no JPEG or whose header ends before the frame header."""
    if data[:3] != b"\xff\xd8\xff":
        return 0
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return 0
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF_MARKERS:
            return data[i + 9]
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return 0


def read_encoded(path: str) -> bytearray | None:
    """The file's bytes (a writable buffer torch can wrap without a copy); None if it cannot be read
    or is empty (the Pillow path then names the reason)."""
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
    except OSError:
        return None
    return data or None


def nvjpeg_problem(device: torch.device | str) -> str | None:
    """Why this torchvision cannot decode JPEG on ``device`` (a tiny image is tried once per
    device), or None when it can."""
    device = torch.device(device)
    key = str(device)
    if device.type not in ("cpu", "cuda"):
        return f"torchvision's decode_jpeg decodes on cpu or cuda, not {device}"
    if key not in _PROBLEMS:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 30, 90)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        try:
            out = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0]
            _PROBLEMS[key] = None if tuple(out.shape) == (3, 8, 16) else f"decoded shape {tuple(out.shape)}"
        except Exception as e:  # noqa: BLE001 - any failure means: not on this device
            import torchvision

            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            _PROBLEMS[key] = f"torchvision {torchvision.__version__} cannot decode JPEG on {device}: {first}"
    return _PROBLEMS[key]


class NvJPEGLoader(Loader):
    """Batches decoded with ``torchvision.io.decode_jpeg`` on ``decode_device`` (default: ``device``),
    augmented there; one batch prepared ahead in a background thread."""

    kind = "nvjpeg"

    def __init__(self, images: ImageList, batch_size: int, img_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 strict: bool = False, num_threads: int = 4, with_labels: bool = False,
                 dtype: torch.dtype = torch.float32, shuffle: bool = True, drop_last: bool = False,
                 scale: tuple[float, float] = SCALE, decode_device: torch.device | str | None = None,
                 prefetch: int = 1) -> None:
        super().__init__(batch_size, seed, rank, world_size, drop_last, with_labels, len(images),
                         device, dtype, shuffle, images.root)
        self.decode_device = torch.device(decode_device) if decode_device is not None else self.device
        if self.decode_device.type == "cuda" and self.decode_device.index is None:
            self.decode_device = torch.device("cuda", torch.cuda.current_device())
        problem = nvjpeg_problem(self.decode_device)
        if problem is not None:
            raise ValueError(f"the nvjpeg loader cannot run here: {problem} (use --loader pil)")
        self.images, self.img_size, self.scale, self.strict = images, img_size, scale, strict
        self.prefetch = prefetch
        self.skipped = list(images.skipped)
        self._labels = torch.tensor(images.labels, dtype=torch.long)
        self._pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="mae-read")

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches, size = list(self._batch_ranges(self.order(epoch), start)), self.img_size
        reads: dict[int, list] = {}

        def produce(b: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
            for j in (b, b + 1):  # file reads run one batch ahead of decoding
                if j < len(batches) and j not in reads:
                    reads[j] = [self._pool.submit(read_encoded, self.images.paths[i]) for i in batches[j]]
            return self._make_batch(epoch, batches[b], [f.result() for f in reads.pop(b)], size)

        for images, labels, errors in prefetched(produce, len(batches), self.decode_device, self.prefetch):
            self._report_unreadable(errors)
            if len(labels):
                yield images, labels

    def _make_batch(self, epoch: int, idx: list[int], encoded: list[bytearray | None], size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Decode, crop, resize to ``size`` px, flip and normalize one batch: (images, labels, unreadable
        files)."""
        decoded = self.decode(idx, encoded)
        keep = [k for k, img in enumerate(decoded) if not isinstance(img, str)]
        errors = [img for img in decoded if isinstance(img, str)]
        if not keep:
            empty = torch.empty(0, 3, size, size, device=self.device, dtype=self.dtype)
            return empty, torch.empty(0, dtype=torch.long, device=self.device), errors
        good = np.asarray([idx[k] for k in keep])
        imgs = [decoded[k] for k in keep]
        wh = np.asarray([(img.shape[-1], img.shape[-2]) for img in imgs])
        boxes, flips = sample_params_batch(wh[:, 0], wh[:, 1], self.seed, epoch, good, self.scale)
        images = normalize(resized_crops(imgs, size, boxes, flips), self.dtype)
        labels = self._labels[torch.from_numpy(good)]
        return (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                errors)

    def decode(self, idx: list[int], encoded: list[bytearray | None]) -> list[torch.Tensor | str]:
        """uint8 (3, H, W) images on the decode device, or "path: why" for an unreadable file."""
        out: list[torch.Tensor | str | None] = [None] * len(idx)
        channels = [jpeg_components(data) if data is not None else 0 for data in encoded]
        batch = [k for k, c in enumerate(channels) if c in (1, 3)]
        if batch:
            tensors = [torch.frombuffer(encoded[k], dtype=torch.uint8) for k in batch]
            try:
                images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.decode_device)
            except RuntimeError:  # one bad file fails the batch: find it
                images = [self._decode_one(t, self.decode_device) for t in tensors]
            for k, img in zip(batch, images):
                out[k] = img
        for k in (k for k, c in enumerate(channels) if c == 4):
            img = self._decode_one(torch.frombuffer(encoded[k], dtype=torch.uint8), torch.device("cpu"))
            out[k] = img.to(self.decode_device, non_blocking=True) if img is not None else None
        for k, img in enumerate(out):
            if img is None:  # no JPEG, or one the decoder refused: Pillow, or the reason it fails
                pil, reason = load_rgb_or_reason(self.images.paths[idx[k]], self.strict)
                out[k] = reason if pil is None else pil_to_tensor(pil).to(self.decode_device)
        return out  # type: ignore[return-value]

    @staticmethod
    def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return None

    def close(self) -> None:
        """Stop the file-reading threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)

"""Image sources for the loaders: list the files of a folder, an ImageFolder tree or a list file,
and screen out unreadable ones before training starts."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from mae_fast.errors import STRICT_DATA_HINT, NoReadableImagesError, UnreadableImageError

log = logging.getLogger("mae_fast.data")

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEMO_DIR = Path(__file__).resolve().parent.parent / "mae_fast" / "assets" / "demo"




@dataclass
class ImageList:
    """Readable images (path, label, width, height) plus the files that were skipped."""

    paths: list[str]
    labels: list[int]
    sizes: list[tuple[int, int]]  # (width, height) as stored (no EXIF rotation)
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    root: str = ""

    def __len__(self) -> int:
        return len(self.paths)


def demo_dir() -> Path:
    """Folder of the bundled demo photographs (public-domain scikit-image samples)."""
    import mae_fast

    installed = Path(mae_fast.__file__).resolve().parent / "assets" / "demo"
    return installed if installed.is_dir() else DEMO_DIR


def _is_image(name: str, extensions: Sequence[str]) -> bool:
    return name.lower().endswith(tuple(extensions)) and not name.startswith(".")


def _walk(root: Path, extensions: Sequence[str]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image(f, extensions))
    return out


def list_images(source: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS
                ) -> tuple[list[str], list[int], list[str]]:
    """Resolve ``source`` to (paths, labels, class names).

    ``source``: "demo"; a folder whose sub-folders are classes (ImageFolder; images directly in the
    root are ignored then); a flat folder (label -1); or a text file with one path per line,
    optionally followed by a TAB and an integer label (relative paths are relative to the file).
    """
    if str(source) == "demo":
        source = demo_dir()
    root = Path(source).expanduser()
    exts = ", ".join(extensions)
    if not root.exists():
        raise FileNotFoundError(f"image source {str(root)!r} does not exist (expected a folder of "
                                f"images, an ImageFolder tree, a text file listing images, or 'demo')")
    if root.is_file():
        if _is_image(root.name, extensions):
            raise ValueError(f"{str(root)!r} is an image file: pass the folder that holds it, or a "
                             f"text file listing images")
        return _read_list_file(root)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes, paths, labels = [], [], []
    for d in subdirs:
        files = _walk(d, extensions)
        if files:
            labels.extend([len(classes)] * len(files))
            classes.append(d.name)
            paths.extend(str(f) for f in files)
    if paths and any(_is_image(f.name, extensions) and f.is_file() for f in root.iterdir()):
        log.warning("%s has class sub-folders: the images directly in it are not used", root)
    if not paths:  # flat folder
        paths = [str(root / f) for f in sorted(os.listdir(root))
                 if _is_image(f, extensions) and (root / f).is_file()]
        labels = [-1] * len(paths)
    if not paths:
        raise FileNotFoundError(f"no images found in {str(root)!r}: looked for files ending in "
                                f"{exts} (case-insensitive) directly in it and in its sub-folders")
    return paths, labels, classes


def _read_list_file(path: Path) -> tuple[list[str], list[int], list[str]]:
    paths, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, label = line, -1
        if "\t" in line:
            name, _, lab = line.rpartition("\t")
            try:
                label = int(lab)
            except ValueError:
                name, label = line, -1
        p = Path(name.strip()).expanduser()
        paths.append(str(p if p.is_absolute() else path.parent / p))
        labels.append(label)
    if not paths:
        raise FileNotFoundError(f"image list {str(path)!r} names no images (expected one path per "
                                f"line, optionally followed by a TAB and an integer label)")
    return paths, labels, []


def _tail_ok(path: str, fmt: str | None) -> bool:
    """Cheap truncation check: a JPEG ends with EOI (FFD9), a PNG with its IEND chunk."""
    if fmt not in ("JPEG", "PNG"):
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        n = f.tell()
        f.seek(max(0, n - 64))
        tail = f.read()
    return (b"\xff\xd9" in tail) if fmt == "JPEG" else (b"IEND" in tail)


def check_image(path: str, full: bool = False) -> tuple[int, int] | str:
    """Return (width, height) of a readable image, else the reason it is unreadable.

    The fast check reads the header and the file's tail; a file whose tail looks truncated (or any
    file with ``full=True``) is decoded completely with Pillow.
    """
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
            if full or not _tail_ok(path, fmt):
                im.load()
        if size[0] < 1 or size[1] < 1:
            return f"empty image ({size[0]}x{size[1]} px)"
        return size
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image Pillow can identify (empty, text or unsupported format)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"cannot decode: {e}"


def _cache_file(source: str | os.PathLike, paths: list[str], verify: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mae_fast" / "scans"
    h = hashlib.sha1(f"{Path(source).resolve()}|{verify}|".encode())
    h.update("\n".join(paths).encode())
    return base / f"{h.hexdigest()[:20]}.json"


def _load_cache(path: Path, n: int) -> list | None:
    try:
        sizes = json.loads(path.read_text())["sizes"]
        return sizes if len(sizes) == n else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_cache(path: Path, sizes: list) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"sizes": [s if isinstance(s, str) else list(s) for s in sizes]}))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home only costs the next start a re-scan
        log.debug("could not write the scan cache %s: %s", path, e)


def scan_images(source: str | os.PathLike, strict: bool = False, verify: str = "fast",
                num_threads: int | None = None, extensions: Sequence[str] = IMG_EXTENSIONS,
                cache: bool | None = None) -> ImageList:
    """List ``source`` and check every file (``verify``: "fast", "full" decode, or "none").

    Unreadable files are logged (one warning line each) and left out, or with ``strict=True`` the
    first one raises :class:`UnreadableImageError` naming it. ``cache`` (default: on for 10,000
    files or more) keeps the results under ~/.cache/mae_fast/scans, keyed by the list of paths.
    """
    if verify not in ("fast", "full", "none"):
        raise ValueError(f"verify must be 'fast', 'full' or 'none', not {verify!r}")
    paths, labels, classes = list_images(source, extensions)
    sizes: list | None = None
    use_cache = (len(paths) >= 10_000) if cache is None else cache
    cache_path = _cache_file(source, paths, verify) if use_cache and verify != "none" else None
    if verify == "none":
        sizes = [(0, 0)] * len(paths)
    elif cache_path is not None:
        sizes = _load_cache(cache_path, len(paths))
        if sizes is not None:
            log.info("image scan of %d files loaded from %s", len(paths), cache_path)
    if sizes is None:
        threads = num_threads or min(32, (os.cpu_count() or 1) * 4)
        with ThreadPoolExecutor(threads) as ex:
            sizes = list(ex.map(lambda p: check_image(p, verify == "full"), paths, chunksize=64))
        if cache_path is not None:
            _save_cache(cache_path, sizes)
    out = ImageList([], [], [], classes, [], str(source))
    for p, lab, s in zip(paths, labels, sizes):
        if isinstance(s, str):
            if strict:
                raise UnreadableImageError(f"unreadable image {p!r}: {s} ({STRICT_DATA_HINT})")
            log.warning("skipping unreadable image %s: %s", p, s)
            out.skipped.append((p, s))
        else:
            out.paths.append(p)
            out.labels.append(lab)
            out.sizes.append((int(s[0]), int(s[1])))
    if not out.paths:
        raise NoReadableImagesError(f"none of the {len(paths)} image file(s) in {str(source)!r} could "
                                    f"be read (each is named in a warning above)")
    return out


def scan_source(source: str | os.PathLike, strict: bool = False, verify: str = "fast", rank: int = 0,
                world_size: int = 1) -> ImageList:
    """:func:`scan_images` once per job: under torch.distributed rank 0 scans first (and fills the
    cache), then the other ranks."""
    import torch.distributed as dist

    coordinated = world_size > 1 and dist.is_available() and dist.is_initialized()
    if coordinated and rank != 0:
        dist.barrier()
    try:
        return scan_images(source, strict=strict, verify=verify)
    finally:
        if coordinated and rank == 0:
            dist.barrier()

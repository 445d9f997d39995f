"""Tar shards in the WebDataset layout as a data source: resolve ``--data`` (brace pattern, folder of
``.tar`` files, list file), index every shard once (samples, image member offsets, sizes, ``.cls``
labels; bad samples named by shard and key) and compute each epoch's reading order.

Order (shared by the PIL and DALI shard loaders). Each epoch the shards are permuted from
``seed + epoch`` (as :func:`epoch_order` permutes files) and their samples concatenated; the
sequence is cut into ``streams`` contiguous, equally long runs (a run may start or end inside a
shard), and each run is read in blocks of at most ``block`` consecutive samples of one shard, each
block in a permutation seeded by (seed, epoch, block start): the sample buffer. Global position
``g`` is item ``g // streams`` of stream ``g % streams``, and rank ``r`` takes positions
``r, r + W, ...`` (as folder data), which are exactly the items of streams ``r, r + W, ...``: every
rank reads only its own shards, and a run resumes from (shard, offset) without reading anything
before it. The order depends on (seed, epoch, streams, block), not on the number of ranks: with a
fixed ``streams`` that every world size used divides, 1, 2 or 8 processes see the same global batches.
``streams=0`` means one stream per rank (the order then depends on the world size).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mae_fast.errors import ShardError, UnreadableImageError

from .loader_base import epoch_order

log = logging.getLogger("mae_fast.data")

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CLASSES_FILE = "classes.txt"  # class names, one per line (label = line number), beside the shards
DEFAULT_BLOCK = 1000
_INDEX_VERSION = 1



def webdataset_module(name: str) -> Any:
    """``import name`` (webdataset or its braceexpand), or a ShardError saying tar shards need it: an image
    without webdataset still runs everything but shards."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ShardError(f"tar shards need the webdataset package ({e.name or name} is not installed): "
                         f"pip install webdataset") from None


# ---------------------------------------------------------------- sources
def _brace_expand(pattern: str) -> list[str]:
    return list(webdataset_module("braceexpand").braceexpand(pattern))


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(".tar") and not Path(name).name.startswith(".")


def _list_file_lines(path: Path) -> list[str]:
    lines = (ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def is_shard_source(source: str | os.PathLike | None) -> bool:
    """Whether ``source`` names tar shards: a brace pattern or a path ending in ``.tar``, a folder
    holding ``.tar`` files, or a text file whose lines name ``.tar`` files."""
    if source is None or str(source) == "demo":
        return False
    text = str(source)
    if _is_shard_name(text) or ("{" in text and ".tar" in text.lower()):
        return True
    path = Path(text).expanduser()
    if path.is_dir():
        return any(_is_shard_name(p.name) and p.is_file() for p in path.iterdir())
    if path.is_file() and path.stat().st_size < 64 << 20:
        try:
            lines = _list_file_lines(path)
        except OSError:
            return False
        return bool(lines) and all(_is_shard_name(ln) for ln in lines)
    return False


def list_shards(source: str | os.PathLike) -> list[str]:
    """The shard files ``source`` names, in order (sorted for a folder); every one must exist."""
    text = str(source)
    path = Path(text).expanduser()
    if "{" in text and not path.exists():
        shards = [str(Path(p).expanduser()) for p in _brace_expand(text)]
        what = f"pattern {text!r}"
    elif path.is_dir():
        shards = sorted(str(p) for p in path.iterdir() if _is_shard_name(p.name) and p.is_file())
        what = f"folder {text!r}"
    elif path.is_file() and not _is_shard_name(path.name):
        shards = [str(p if p.is_absolute() else path.parent / p)
                  for p in map(lambda ln: Path(ln).expanduser(), _list_file_lines(path))]
        what = f"list file {text!r}"
    else:
        shards, what = [str(path)], f"shard {text!r}"
    if not shards:
        raise ShardError(f"{what} names no .tar shards")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise ShardError(f"{what}: {len(missing)} of {len(shards)} shard(s) do not exist, e.g. "
                         f"{missing[0]!r}")
    return shards


def read_classes(shards: Sequence[str]) -> list[str]:
    """Class names from ``classes.txt`` in the first shard's folder (written by mae-make-shards)."""
    path = Path(shards[0]).parent / CLASSES_FILE
    return _list_file_lines(path) if path.is_file() else []


# ---------------------------------------------------------------- index
def _check_member(view: Any, size: int, full: bool) -> tuple[int, int] | str:
    """(width, height) of the image in a tar member view, else why it is unreadable: the header is
    read and the tail checked for truncation (JPEG EOI, PNG IEND), as the folder pre-scan does; a
    file whose tail looks truncated (or any with ``full``) is decoded completely."""
    try:
        with Image.open(view) as im:
            wh, fmt = im.size, im.format
            looks_truncated = False
            if not full and fmt in ("JPEG", "PNG"):
                view.seek(max(0, size - 64))
                looks_truncated = (b"\xff\xd9" if fmt == "JPEG" else b"IEND") not in view.read()
            if full or looks_truncated:
                im.load()  # seeks to the image data itself
        if wh[0] < 1 or wh[1] < 1:
            return f"empty image ({wh[0]}x{wh[1]} px)"
        return wh
    except UnidentifiedImageError:
        return "not an image Pillow can identify (empty, text or unsupported format)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"cannot decode: {e}"


def index_shard(path: str, verify: str = "fast") -> dict[str, Any]:
    """One shard's samples in file order: key, header offset of its first member, image member
    (extension, data offset, size), ``.cls`` label (-1 if none), image width and height (0 with
    ``verify='none'``), plus ``bad``: (key, reason) of the samples left out."""
    base_plus_ext = webdataset_module("webdataset.tariterators").base_plus_ext

    keys: list[str] = []
    cols: dict[str, list[int]] = {c: [] for c in ("header", "offset", "size", "label", "width", "height")}
    exts: list[str] = []
    bad: list[tuple[str, str]] = []
    try:
        tar = tarfile.open(path, mode="r:")  # reads the headers, seeks over the data
    except (OSError, tarfile.TarError) as e:
        raise ShardError(f"shard {path!r} cannot be read as a tar file: {e}") from e
    with tar:
        current: dict[str, Any] | None = None
        samples: list[dict[str, Any]] = []
        try:
            for m in tar:
                if not m.isreg():
                    continue
                base, ext = base_plus_ext(m.name)
                if base is None or Path(base).name.startswith("__"):
                    continue  # no extension, or webdataset metadata
                if current is None or current["key"] != base:
                    current = {"key": base, "header": m.offset, "image": None, "label": -1, "err": None}
                    samples.append(current)
                ext = ext.lower()
                if ext in IMAGE_EXTS and current["image"] is None:
                    current["image"] = (ext, m)
                elif ext == "cls":
                    text = tar.extractfile(m).read().decode("utf-8", "replace").strip()
                    try:
                        current["label"] = int(text)
                    except ValueError:
                        current["err"] = f"its .cls member holds {text[:20]!r}, not an integer label"
        except (OSError, tarfile.TarError) as e:
            raise ShardError(f"shard {path!r} is truncated or corrupt after {len(samples)} sample(s): "
                             f"{e}") from e
        for s in samples:
            if s["err"] is None and s["image"] is None:
                s["err"] = f"no image member (.{', .'.join(IMAGE_EXTS)})"
            wh: tuple[int, int] | str = (0, 0)
            if s["err"] is None and verify != "none":
                m = s["image"][1]
                wh = _check_member(tar.extractfile(m), m.size, verify == "full")
            if s["err"] is not None or isinstance(wh, str):
                bad.append((s["key"], s["err"] or str(wh)))
                continue
            ext, m = s["image"]
            keys.append(s["key"])
            exts.append(ext)
            for c, v in zip(cols, (s["header"], m.offset_data, m.size, s["label"], wh[0], wh[1])):
                cols[c].append(int(v))
    return {"version": _INDEX_VERSION, "keys": keys, "exts": exts, **cols, "bad": bad}


def _cache_path(path: str, verify: str) -> Path:
    st = os.stat(path)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mae_fast" / "shards"
    h = hashlib.sha1(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{verify}|"
                     f"{_INDEX_VERSION}".encode())
    return base / f"{h.hexdigest()[:24]}.json"


def cached_index(path: str, verify: str = "fast", cache: bool = True) -> dict[str, Any]:
    """:func:`index_shard`, kept under ~/.cache/mae_fast/shards keyed by the shard's path, size and
    modification time (a rewritten shard is indexed again)."""
    cpath = _cache_path(path, verify) if cache else None
    if cpath is not None and cpath.is_file():
        try:
            return json.loads(cpath.read_text())
        except (OSError, ValueError) as e:  # a damaged cache entry: index the shard again and rewrite it
            log.info("shard index cache %s unreadable (%s): indexing %s again", cpath, type(e).__name__, path)
    index = index_shard(path, verify)
    if cpath is not None:
        try:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = cpath.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, cpath)
        except OSError as e:  # a read-only home only costs the next start a re-index
            log.debug("could not write the shard index cache %s: %s", cpath, e)
    return index


@dataclass
class ShardSet:
    """Every readable sample of a list of shards (``gid`` = position in shard order), with the
    attributes the folder :class:`ImageList` offers to the training commands (labels, classes,
    skipped, root)."""

    shards: list[str]
    counts: np.ndarray            # samples per shard
    keys: list[str]
    header: np.ndarray            # offset of each sample's first tar header in its shard
    img_offset: np.ndarray        # offset and size of the image member's data
    img_size: np.ndarray
    labels_arr: np.ndarray
    wh: np.ndarray                # (N, 2) width, height as stored
    classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("shard (sample key)", reason)
    root: str = ""

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def labels(self) -> list[int]:
        return self.labels_arr.tolist()

    def shard_of(self, gid: int) -> int:
        return int(np.searchsorted(self.starts, gid, side="right") - 1)

    def name(self, gid: int) -> str:
        """'shard.tar (sample KEY)': how warnings and errors name a sample."""
        return sample_name(self.shards[self.shard_of(gid)], self.keys[gid])


def sample_name(shard: str, key: str) -> str:
    return f"{shard} (sample {key})"


def _gathered_indexes(shards: list[str], verify: str, rank: int, world_size: int, cache: bool
                      ) -> list[dict[str, Any]]:
    """Index every shard; under torch.distributed each rank indexes every W-th and all share."""
    import torch.distributed as dist

    coordinated = world_size > 1 and dist.is_available() and dist.is_initialized()
    mine = list(range(rank, len(shards), world_size)) if coordinated else list(range(len(shards)))
    threads = min(16, max(1, len(mine)), (os.cpu_count() or 1) * 2)
    errors: dict[int, str] = {}

    def one(i: int) -> dict[str, Any] | None:
        try:
            return cached_index(shards[i], verify, cache)
        except ShardError as e:  # shared below, so that every rank stops with the same error
            errors[i] = str(e)
            return None

    with ThreadPoolExecutor(threads) as ex:
        local = dict(zip(mine, ex.map(one, mine)))
    if coordinated:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, (local, errors))
        local, errors = {}, {}
        for idx, errs in parts:
            local.update(idx)
            errors.update(errs)
    if errors:
        raise ShardError(errors[min(errors)])
    return [local[i] for i in range(len(shards))]


def scan_shards(source: str | os.PathLike, strict: bool = False, verify: str = "fast", rank: int = 0,
                world_size: int = 1, cache: bool = True) -> ShardSet:
    """Index the shards ``source`` names. Unreadable samples are logged (one warning each, naming
    shard and key) and left out, or with ``strict`` the first raises UnreadableImageError."""
    if verify not in ("fast", "full", "none"):
        raise ValueError(f"verify must be 'fast', 'full' or 'none', not {verify!r}")
    shards = list_shards(source)
    indexes = _gathered_indexes(shards, verify, rank, world_size, cache)
    skipped = [(sample_name(s, k), why) for s, idx in zip(shards, indexes) for k, why in idx["bad"]]
    if skipped and strict:
        raise UnreadableImageError(f"unreadable sample {skipped[0][0]}: {skipped[0][1]} (strict; "
                                   f"{len(skipped)} such sample(s))")
    if rank == 0:
        for name, why in skipped:
            log.warning("skipping unreadable image %s: %s", name, why)

    def cat(col: str) -> np.ndarray:
        return np.asarray([v for idx in indexes for v in idx[col]], dtype=np.int64)

    out = ShardSet(shards, np.asarray([len(i["keys"]) for i in indexes], dtype=np.int64),
                   [k for i in indexes for k in i["keys"]], cat("header"), cat("offset"), cat("size"),
                   cat("label"), np.stack([cat("width"), cat("height")], axis=1).reshape(-1, 2),
                   read_classes(shards), skipped, str(source))
    if len(out) == 0:
        raise UnreadableImageError(f"no readable image samples in the {len(shards)} shard(s) of "
                                   f"{str(source)!r} ({len(skipped)} unreadable, named above)")
    labelled = out.labels_arr >= 0
    if labelled.any() and not labelled.all():
        gid = int(np.argmin(labelled))
        raise ShardError(f"{out.name(gid)} has no .cls label but other samples do: label every sample "
                         f"or none")
    return out


# ---------------------------------------------------------------- order
@dataclass
class Block:
    """Samples ``first .. first + len(perm) - 1`` of one shard (in the ShardSet's numbering of that
    shard's readable samples), read in the order ``first + perm``."""

    shard: int
    first: int
    perm: np.ndarray


def _block_seed(seed: int, epoch: int, start: int) -> int:
    return ((int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + int(start)) % 2**63


def resolve_streams(streams: int, world_size: int, num_samples: int) -> int:
    """The number of streams: ``streams`` (0: one per rank), checked against the world size."""
    v = streams or world_size
    if v % world_size:
        raise ShardError(f"--data-streams {streams} is not a multiple of the world size {world_size}: "
                         f"each process reads whole streams")
    if v > num_samples:
        raise ShardError(f"{v} data streams but only {num_samples} samples")
    return v


def stream_blocks(ss: ShardSet, seed: int, epoch: int, streams: int, stream: int,
                  block: int = DEFAULT_BLOCK, shuffle: bool = True) -> list[Block]:
    """The blocks of ``stream`` (0 <= stream < streams) in ``epoch``, in reading order."""
    order = epoch_order(len(ss.shards), seed, epoch, shuffle=shuffle)
    counts = ss.counts[order]
    ends = np.cumsum(counts)
    n = int(ends[-1])
    base, extra = divmod(n, streams)
    lo = stream * base + min(stream, extra)
    hi = lo + base + (1 if stream < extra else 0)
    out: list[Block] = []
    j = int(np.searchsorted(ends, lo, side="right"))
    pos = lo
    while pos < hi:
        shard_start = int(ends[j] - counts[j])
        piece_end = min(hi, int(ends[j]))
        while pos < piece_end:
            size = min(block, piece_end - pos)
            if shuffle:
                g = torch.Generator().manual_seed(_block_seed(seed, epoch, pos))
                perm = torch.randperm(size, generator=g).numpy()
            else:
                perm = np.arange(size)
            out.append(Block(int(order[j]), pos - shard_start, perm))
            pos += size
        j += 1
    return out


def block_gids(ss: ShardSet, blocks: Sequence[Block]) -> np.ndarray:
    """Global sample ids of ``blocks`` in reading order."""
    if not blocks:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([ss.starts[b.shard] + b.first + b.perm for b in blocks]).astype(np.int64)


def skip_items(blocks: Sequence[Block], n: int) -> list[Block]:
    """``blocks`` without their first ``n`` items (a partly read block keeps its tail)."""
    out: list[Block] = []
    for b in blocks:
        if n >= len(b.perm):
            n -= len(b.perm)
            continue
        out.append(Block(b.shard, b.first, b.perm[n:]) if n else b)
        n = 0
    return out


def rank_streams(rank: int, world_size: int, streams: int) -> list[int]:
    """The streams rank ``rank`` reads: ``rank, rank + W, ...``; its local row k is item k // K of
    the (k % K)-th of them (K = streams / W)."""
    return list(range(rank, streams, world_size))


def rank_rows(ss: ShardSet, seed: int, epoch: int, streams: int, rank: int, world_size: int,
              block: int = DEFAULT_BLOCK, shuffle: bool = True) -> np.ndarray:
    """Global sample ids rank ``rank`` reads in ``epoch`` (all of them, before drop_last)."""
    mine = rank_streams(rank, world_size, streams)
    items = [block_gids(ss, stream_blocks(ss, seed, epoch, streams, v, block, shuffle)) for v in mine]
    rows = np.empty(sum(len(x) for x in items), dtype=np.int64)
    for m, x in enumerate(items):
        rows[m::len(mine)] = x
    return rows


# ---------------------------------------------------------------- reading (webdataset)
def read_blocks(ss: ShardSet, blocks: Iterator[Block] | Sequence[Block]
                ) -> Iterator[tuple[int, bytes]]:
    """(gid, image bytes) of ``blocks`` in order: each block is streamed with webdataset's tar
    iterator from its first sample's header (a seek, no read before it) and yielded permuted."""
    tariterators = webdataset_module("webdataset.tariterators")
    group_by_keys, tar_file_expander = tariterators.group_by_keys, tariterators.tar_file_expander

    for b in blocks:
        path, lo = ss.shards[b.shard], int(ss.starts[b.shard]) + b.first
        gids = (lo + b.perm).tolist()  # a partly read block: the tail of its permutation
        want, n = {ss.keys[g]: g for g in gids}, len(gids)
        got: dict[int, bytes] = {}
        with open(path, "rb") as f:
            f.seek(int(ss.header[min(gids)]))
            for sample in group_by_keys(tar_file_expander([{"url": path, "stream": f}])):
                gid = want.get(sample["__key__"])
                if gid is None:
                    continue  # a sample left out when indexing
                data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                if data is None or len(data) != int(ss.img_size[gid]):
                    raise ShardError(f"{ss.name(gid)} differs from its index (the shard changed "
                                     f"after it was indexed? its cached index is keyed by size and "
                                     f"modification time)")
                got[gid] = data
                if len(got) == n:
                    break
        if len(got) != n:
            lost = next(g for g in gids if g not in got)
            raise ShardError(f"{ss.name(lost)} was not found where its index says (shard changed "
                             f"or truncated after indexing)")
        for g in gids:
            yield g, got[g]


def decode_bytes(data: bytes) -> Image.Image:
    """Decode image bytes to RGB with the folder loaders' conversions (CMYK, L, RGBA, P, ...)."""
    from .transforms import load_rgb

    return load_rgb(io.BytesIO(data))  # type: ignore[arg-type]

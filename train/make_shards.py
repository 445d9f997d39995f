"""``mae-make-shards SRC DST``: write tar shards in the WebDataset layout from an image folder, an
ImageFolder tree (labels from the class folders, as ``.cls``; names in ``DST/classes.txt``) or a list
file, with webdataset's ShardWriter.

    mae-make-shards /data/imagenet/train /data/shards/train --shard-size 1GB
    mae-pretrain --data /data/shards/train ...          # or '/data/shards/train/shard-{000000..000139}.tar'

Images are written in a seeded random order (``--seed``; ``--no-shuffle`` keeps the folder order) so
that every shard holds a mix of classes: training reads shards in blocks and shuffles within them.
Unreadable files are skipped with one warning each (``--strict-data`` stops); JPEG, PNG and WebP files
are copied byte for byte, other formats are stored as PNG.
"""
from __future__ import annotations

import argparse
import io
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image

from mae_fast.errors import ConfigError

from .data.shards import CLASSES_FILE, IMAGE_EXTS, webdataset_module
from .data.sources import ImageList, scan_images
from .engine.cli import dataclass_parser, opt, parse_config, run_main

log = logging.getLogger("mae_fast.train")

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GB', '500MB', '1.5G', '64MiB', '1000000' -> bytes (decimal units, binary with 'iB')."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"--shard-size {text!r}: expected a size such as 1GB, 500MB, 64MiB or a number of bytes")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"--shard-size {text!r} is below one byte")
    return size


@dataclass
class MakeShardsConfig:
    """Options of ``mae-make-shards`` (SRC and DST are positional)."""

    src: str = opt("image folder, ImageFolder tree, list file of images, or 'demo'", "")
    dst: str = opt("output folder for the shards", "")
    shard_size: str = opt("start a new shard once one reaches this size (1GB, 500MB, ...)", "1GB")
    max_count: int = opt("at most this many images per shard (0: no limit)", 0, min=0)
    prefix: str = opt("shard file names: PREFIX-000000.tar, PREFIX-000001.tar, ...", "shard")
    seed: int = opt("seed of the order images are written in", 0, min=0)
    shuffle: bool = opt("write the images in a seeded random order (else in folder order)", True)
    verify: str = opt("pre-check of each image: fast (header + tail) | full (decode) | none", "fast",
                      choices=["fast", "full", "none"])
    strict_data: bool = opt("stop at the first unreadable image instead of skipping it", False)
    overwrite: bool = opt("replace .tar shards already in DST", False)
    progress: bool = opt("show a tqdm progress bar", True)


def sample_keys(images: ImageList) -> List[str]:
    """A unique WebDataset key per image: its path below the source root without extension, with
    the dots webdataset would read as extensions replaced."""
    root = Path(images.root if images.root and images.root != "demo" else Path(images.paths[0]).parent)
    seen: Dict[str, int] = {}
    keys = []
    for p in images.paths:
        path = Path(p)
        try:
            rel = path.relative_to(root).with_suffix("")
        except ValueError:
            rel = Path(path.stem)
        key = re.sub(r"[^A-Za-z0-9_/-]", "_", rel.as_posix())
        n = seen.get(key, 0)
        seen[key] = n + 1
        keys.append(key if n == 0 else f"{key}_{n}")
    return keys


def encoded(path: str) -> tuple[str, bytes]:
    """(extension, bytes) to store: JPEG/PNG/WebP as they are, anything else re-encoded as PNG."""
    fmt_ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
    with Image.open(path) as im:
        ext = fmt_ext.get(im.format or "")
        if ext is None:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return "png", buf.getvalue()
    assert ext in IMAGE_EXTS
    return ext, Path(path).read_bytes()


def make_shards(cfg: MakeShardsConfig) -> Dict[str, Any]:
    """Write the shards; returns counts (images, shards, skipped, bytes) and the shard paths."""
    wds = webdataset_module("webdataset")
    if not cfg.src or not cfg.dst:
        raise ConfigError("usage: mae-make-shards SRC DST [--shard-size 1GB]")
    max_size = parse_size(cfg.shard_size)
    dst = Path(cfg.dst).expanduser()
    old = sorted(dst.glob(f"{cfg.prefix}-*.tar")) if dst.is_dir() else []
    if old and not cfg.overwrite:
        raise ConfigError(f"{dst} already holds {len(old)} shard(s) named {cfg.prefix}-*.tar: pass --overwrite "
                          f"to replace them, or another DST / --prefix")
    images = scan_images(cfg.src, strict=cfg.strict_data, verify=cfg.verify)
    keys = sample_keys(images)
    order = np.random.default_rng(cfg.seed).permutation(len(images)) if cfg.shuffle else np.arange(len(images))
    dst.mkdir(parents=True, exist_ok=True)
    for p in old:
        p.unlink()
    if images.classes:
        (dst / CLASSES_FILE).write_text("\n".join(images.classes) + "\n")
    written, failed, total = 0, list(images.skipped), 0
    from tqdm import tqdm

    bar = tqdm(total=len(images), desc="mae-make-shards", unit="img", disable=not cfg.progress)
    with wds.ShardWriter(str(dst / f"{cfg.prefix}-%06d.tar"), maxsize=max_size,
                         maxcount=cfg.max_count or 10**12, verbose=0) as sink:
        for i in order.tolist():
            try:
                ext, data = encoded(images.paths[i])
            except OSError as e:  # changed or removed since the scan
                if cfg.strict_data:
                    raise
                log.warning("skipping unreadable image %s: %s", images.paths[i], e)
                failed.append((images.paths[i], str(e)))
                bar.update(1)
                continue
            sample: Dict[str, Any] = {"__key__": keys[i], ext: data}
            if images.labels[i] >= 0:
                sample["cls"] = images.labels[i]
            sink.write(sample)
            written += 1
            total += len(data)
            bar.update(1)
    bar.close()
    paths = sorted(str(p) for p in dst.glob(f"{cfg.prefix}-*.tar"))
    pattern = f"{dst}/{cfg.prefix}-{{{0:06d}..{len(paths) - 1:06d}}}.tar" if paths else ""
    return {"images": written, "shards": len(paths), "skipped": len(failed), "bytes": total,
            "classes": len(images.classes), "pattern": pattern, "shard_files": paths}


def build_parser() -> argparse.ArgumentParser:
    p = dataclass_parser(MakeShardsConfig, "mae-make-shards", "Write WebDataset tar shards from an image "
                         "folder or ImageFolder tree (labels from class folders as .cls).")
    p.add_argument("src_pos", nargs="?", metavar="SRC", help="image folder, ImageFolder tree, list file or 'demo'")
    p.add_argument("dst_pos", nargs="?", metavar="DST", help="output folder")
    return p


def parse(argv: Optional[List[str]] = None) -> MakeShardsConfig:
    parser = build_parser()
    cfg, args = parse_config(MakeShardsConfig, parser, argv)
    cfg.src = args.src_pos or cfg.src
    cfg.dst = args.dst_pos or cfg.dst
    return cfg


def run(cfg: MakeShardsConfig) -> Dict[str, Any]:
    out = make_shards(cfg)
    print(f"wrote {out['images']} images in {out['shards']} shard(s) ({out['bytes'] / 1e9:.2f} GB) to {cfg.dst}"
          + (f", {out['classes']} classes" if out["classes"] else "")
          + (f"; {out['skipped']} unreadable image(s) skipped" if out["skipped"] else ""), file=sys.stderr)
    if out["pattern"]:
        print(f"train with: --data {cfg.dst}   (or --data '{out['pattern']}')", file=sys.stderr)
    out.pop("shard_files")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    return run_main("mae-make-shards", lambda: parse(argv), run)


if __name__ == "__main__":
    sys.exit(main())

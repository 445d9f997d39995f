"""Loader throughput: images/s of each data loader (MAE augmentation, normalized output on device).

    python -m mae_fast.bench.loader --loader all --data demo --repeat 200 --batch-size 128 --steps 50

On a GPU it also writes a JSON record to bench/results/ (device, date, commit, command, numbers).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mae_fast.bench.records import record_header, write_result
from mae_fast.train.dali_loader import dali_available
from mae_fast.train.data import build_loader
from mae_fast.train.sources import list_images

def _repeated_list(data: str, repeat: int, tmpdir: str) -> str:
    """A list file naming every image of ``data`` ``repeat`` times (a longer epoch from few files)."""
    paths, _, _ = list_images(data)
    path = Path(tmpdir) / "images.txt"
    path.write_text("\n".join(paths * repeat) + "\n")
    return str(path)


def bench_one(kind: str, data: str, batch_size: int, img_size: int, steps: int, warmup: int,
              workers: int | None, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Build one loader and time ``steps`` batches after ``warmup``; images/s over the timed part."""
    t0 = time.perf_counter()
    loader = build_loader(data, kind=kind, batch_size=batch_size, img_size=img_size,
                          device=device, num_workers=workers, dtype=dtype, num_batches=steps)
    build_s = time.perf_counter() - t0
    n_img, t_start, done = 0, None, 0
    while done < warmup + steps:
        for x in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t_start = time.perf_counter()
            if done >= warmup:
                n_img += x.shape[0]
            done += 1
            if done >= warmup + steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - (t_start or time.perf_counter())
    if hasattr(loader, "close"):
        loader.close()
    return {"loader": loader.kind, "images": n_img, "seconds": round(elapsed, 4),
            "images_per_s": round(n_img / max(elapsed, 1e-9), 1), "build_s": round(build_s, 3),
            "num_files": loader.num_files, "workers": workers}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """CLI entry point: print images/s per loader (and save a JSON record on a GPU)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loader", default="all", choices=["all", "auto", "dali", "pil", "synthetic"])
    ap.add_argument("--data", default="demo", help="folder, list file or 'demo'")
    ap.add_argument("--repeat", type=int, default=1, help="list every image this many times")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="PIL workers / DALI threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    if args.loader == "all":
        kinds = ["synthetic", "pil"] + (["dali"] if dali_available() else [])
    else:
        kinds = [args.loader]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _repeated_list(args.data, args.repeat, tmp) if args.repeat > 1 else args.data
        for kind in kinds:
            r = bench_one(kind, data, args.batch_size, args.img_size, args.steps, args.warmup,
                          args.workers, dtype, device)
            results.append(r)
            print(f"{r['loader']:10s} {r['images_per_s']:10.1f} images/s  ({r['images']} images in "
                  f"{r['seconds']:.2f} s; build {r['build_s']:.2f} s; {r['num_files']} files; "
                  f"batch {args.batch_size}, {args.img_size} px, {args.dtype}, {device})",
                  flush=True)
    if device.type == "cuda" and not args.no_save:
        record = {
            **record_header("loader", device),
            "cpu_count": os.cpu_count(), "args": vars(args), "results": results,
        }
        if dali_available():
            import nvidia.dali
            record["dali"] = nvidia.dali.__version__
        out = write_result("loader", record)
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()

"""Loader throughput: images/s of each data loader (MAE augmentation, normalized output on device),
and images/s per CPU core it kept busy (CPU time of this process and its worker processes over
the timed part, divided by the wall time).

    python -m mae_fast.bench.loader --loader all --data demo --repeat 300 --batch-size 128 --steps 30
    python -m mae_fast.bench.loader --data demo --repeat 300 --write-list /tmp/demo-list.txt  # for mae-bench --data

``--loader all`` times synthetic, pil, nvjpeg (decoding on the GPU on a CUDA machine, with
torchvision on the CPU otherwise) and, when installed, dali. A loader that cannot run here gets a row with
its one-line error (the others are still timed and recorded) and the exit status is 1. On a GPU it also writes a JSON record
to bench/results/ (device, date, commit, command, numbers).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mae_fast.train.data.dali_loader import dali_available
from mae_fast.train.data.loaders import KINDS, build_loader
from mae_fast.train.data.sources import list_images

from .records import record_header, write_result


def write_repeated_list(data: str, repeat: int, path: str | os.PathLike) -> str:
    """A list file naming every image of ``data`` ``repeat`` times (a longer epoch from few files)."""
    paths, _, _ = list_images(data)
    Path(path).write_text("\n".join(paths * repeat) + "\n")
    return str(path)


def _tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and of every live descendant process
    (Linux /proc, in clock ticks; elsewhere only the children already reaped)."""
    own = time.process_time()
    if not os.path.isdir("/proc/self/task"):
        t = os.times()
        return own + t.children_user + t.children_system
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in stats.items():
        children.setdefault(parent, []).append(pid)
    total, todo = own, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total


def bench_one(kind: str, data: str, batch_size: int, img_size: int, steps: int, warmup: int,
              workers: int | None, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Build one loader and time ``steps`` batches after ``warmup``: images/s and images/s per CPU
    core over the timed part."""
    t0 = time.perf_counter()
    loader = build_loader(data, kind=kind, batch_size=batch_size, img_size=img_size,
                          device=device, num_workers=workers, dtype=dtype, num_batches=steps)
    build_s = time.perf_counter() - t0
    n_img, t_start, cpu_start, done = 0, None, 0.0, 0
    while done < warmup + steps:
        for x in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t_start, cpu_start = time.perf_counter(), _tree_cpu_seconds()
            if done >= warmup:
                n_img += x.shape[0]
            done += 1
            if done >= warmup + steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    elapsed, cpu_s = now - (t_start or now), _tree_cpu_seconds() - cpu_start
    if hasattr(loader, "close"):
        loader.close()
    cores = cpu_s / max(elapsed, 1e-9)
    return {"loader": loader.kind, "decode_device": decode_device(loader), "images": n_img,
            "seconds": round(elapsed, 4), "images_per_s": round(n_img / max(elapsed, 1e-9), 1),
            "cpu_seconds": round(cpu_s, 3), "cpu_cores_used": round(cores, 2),
            "images_per_s_per_core": round(n_img / cpu_s, 1) if cpu_s > 0 else None,
            "build_s": round(build_s, 3), "num_files": loader.num_files, "workers": workers,
            "cpu_count": os.cpu_count()}


def decode_device(loader: Any) -> str:
    """Where a loader decodes: "none" (synthetic), "cpu", or the GPU (DALI mixed, nvjpeg on CUDA)."""
    if loader.kind == "synthetic":
        return "none"
    if loader.kind == "dali":
        return f"cuda:{loader.device_id}" if loader.device_id is not None else "cpu"
    return str(getattr(loader, "decode_device", "cpu"))


def kinds_for(choice: str) -> list[str]:
    """The loaders ``--loader`` names: "all" is synthetic, pil, nvjpeg and (when installed) dali."""
    if choice == "all":
        return ["synthetic", "pil", "nvjpeg"] + (["dali"] if dali_available() else [])
    return [choice]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """CLI entry point: print images/s per loader (and save a JSON record on a GPU)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loader", default="all", choices=["all", *KINDS])
    ap.add_argument("--data", default="demo", help="folder, list file or 'demo'")
    ap.add_argument("--repeat", type=int, default=1, help="list every image this many times")
    ap.add_argument("--write-list", default=None, metavar="FILE",
                    help="only write the (repeated) list of images to FILE, for mae-bench --data")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None,
                    help="PIL workers / DALI threads / nvjpeg file-reading threads")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    args = ap.parse_args(argv)
    if args.write_list:
        path = write_repeated_list(args.data, args.repeat, args.write_list)
        print(f"wrote {path}")
        return []

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if args.repeat > 1:
            data = write_repeated_list(args.data, args.repeat, Path(tmp) / "images.txt")
        for kind in kinds_for(args.loader):
            try:
                r = bench_one(kind, data, args.batch_size, args.img_size, args.steps, args.warmup,
                              args.workers, dtype, device)
            except Exception as e:  # one loader that cannot run here must not cost the others' rows
                first = (str(e).strip().splitlines() or [""])[0]
                results.append({"loader": kind, "error": f"{type(e).__name__}: {first}"[:300]})
                print(f"{kind:10s} FAILED: {results[-1]['error']}", flush=True)
                continue
            results.append(r)
            per_core = r["images_per_s_per_core"]
            print(f"{r['loader']:10s} {r['images_per_s']:10.1f} images/s  "
                  f"{per_core if per_core is not None else float('nan'):8.1f} per core "
                  f"({r['cpu_cores_used']:.2f} cores busy; decode on {r['decode_device']}; "
                  f"{r['images']} images in {r['seconds']:.2f} s; build {r['build_s']:.2f} s; "
                  f"{r['num_files']} files; batch {args.batch_size}, {args.img_size} px, "
                  f"{args.dtype}, {device})", flush=True)
    if device.type == "cuda" and not args.no_save:
        record = {**record_header("loader", device), "cpu_count": os.cpu_count(), "args": vars(args),
                  "results": results}
        if dali_available():
            import nvidia.dali
            record["dali"] = nvidia.dali.__version__
        out = write_result("loader", record)
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    sys.exit(1 if any("error" in r for r in main()) else 0)

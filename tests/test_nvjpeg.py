"""The nvjpeg loader (torchvision decode_jpeg on the device) against the PIL loader, run with the
decode on the CPU (the same code path as on a GPU): crops, pixels within the measured resize
tolerance, bad files, prefetching, the auto choice. CUDA tests at the end are skipped without a GPU.

Resize tolerance (measured on the demo and bad-file images, 32 / 64 / 224 px, seeds 0-2): PIL resizes
8-bit images in two passes, rounding and clipping to 0..255 between them; the tensor path
(torchvision.transforms.v2.functional.resize, bicubic, antialias) resizes float32 in one go and rounds
at the end. Decoding is identical on the CPU (libjpeg-turbo in both, max difference 0). Measured:
at most 7-10 levels (of 255) at saturated edges, at most 0.25 levels mean per image, at most 0.22% of
values more than 2 levels apart. Asserted: 12 levels, 0.35 levels, 0.5%.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mae_fast.train.data.transforms as augment
import mae_fast.train.data.loaders as data
import mae_fast.train.data.nvjpeg_loader as nvj
from mae_fast.train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mae_fast.train.data.loaders import build_loader, resolve_kind
from mae_fast.train.data.nvjpeg_loader import jpeg_components, nvjpeg_problem, read_encoded
from mae_fast.train.data.sources import demo_dir, scan_images
from mae_fast.errors import UnreadableImageError

BAD = Path(__file__).parent / "assets" / "bad"
UNREADABLE = ["empty.jpg", "not_an_image.jpg", "truncated.jpg"]
NOT_JPEG = ["png_named_jpg.jpg", "rgba.png"]
MAX_LEVELS, MEAN_LEVELS, FRAC_OVER_2 = 12.0, 0.35, 0.005


def make(source="demo", kind="nvjpeg", **kw):
    kw = {"batch_size": 8, "img_size": 32, "device": "cpu", "num_workers": 2, **kw}
    if kind == "pil":
        kw["num_workers"] = 0
    return build_loader(source, kind=kind, **kw)


def levels(x: torch.Tensor) -> torch.Tensor:
    """Normalized images back to 0..255 levels."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return x.float() * std + mean


def assert_within_resize_tolerance(got: torch.Tensor, want: torch.Tensor, max_levels=MAX_LEVELS,
                                   mean_levels=MEAN_LEVELS, frac_over_2=FRAC_OVER_2) -> None:
    assert got.shape == want.shape
    d = (levels(got) - levels(want)).abs()
    assert d.amax() <= max_levels, d.amax()
    assert d.mean((1, 2, 3)).max() <= mean_levels, d.mean((1, 2, 3))
    assert (d > 2).float().mean() <= frac_over_2


def test_jpeg_components_from_the_frame_header():
    for path in [*sorted(demo_dir().glob("*.jpg")), *sorted(BAD.iterdir())]:
        encoded = read_encoded(str(path))
        if path.name == "empty.jpg":
            assert encoded is None
            continue
        try:
            with Image.open(path) as im:
                want = {"L": 1, "RGB": 3, "CMYK": 4}[im.mode] if im.format == "JPEG" else 0
        except OSError:  # not an image at all
            want = 0
        assert jpeg_components(encoded) == want, path.name
    assert jpeg_components(read_encoded(str(BAD / "cmyk.jpg"))) == 4
    assert jpeg_components(b"\xff\xd8\xff\xe0\x00") == 0  # header cut before the frame


def test_resized_crops_is_torchvision_v2_resize():
    """The batched crop + resize computes what v2 resize (bicubic, antialias) does on float images."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF2

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in [(37, 50), (9, 7), (64, 33)]]
    boxes = np.array([[3, 5, 30, 41], [0, 0, 9, 7], [10, 2, 20, 31]])
    flips = np.array([True, False, True])
    got = augment.resized_crops(images, 24, boxes, flips)
    for img, (t, l, h, w), f, x in zip(images, boxes, flips, got):
        want = TF2.resize(img[:, t:t + h, l:l + w].float(), [24, 24], interpolation=InterpolationMode.BICUBIC,
                          antialias=True).clamp(0, 255).round()
        torch.testing.assert_close(x, want.flip(-1) if f else want, rtol=0, atol=0)


@pytest.mark.parametrize("size", [32, 224])
def test_same_crops_and_pixels_as_pil(size, monkeypatch):
    """Every sample gets the PIL loader's crop box and flip; pixels agree within the resize tolerance."""
    seen = {"pil": {}, "nvjpeg": {}}

    def recorder(kind, fn):
        def wrapped(w, h, seed, epoch, index, *a, **k):
            boxes, flips = fn(w, h, seed, epoch, index, *a, **k)
            for i, b, f in zip(np.asarray(index).reshape(-1).tolist(), boxes.tolist(), flips.tolist()):
                seen[kind][i] = (tuple(b), bool(f))
            return boxes, flips
        return wrapped

    monkeypatch.setattr(nvj, "sample_params_batch", recorder("nvjpeg", augment.sample_params_batch))
    monkeypatch.setattr(augment, "sample_params_batch", recorder("pil", augment.sample_params_batch))
    for source in ("demo", BAD):  # BAD: CMYK, grayscale, PNG bytes, RGBA, 7x5 and 1200x40 px
        for kind in seen:
            seen[kind].clear()
        pil = torch.cat(list(make(source, "pil", img_size=size, seed=3)))
        ours = torch.cat(list(make(source, img_size=size, seed=3)))
        assert seen["nvjpeg"] == seen["pil"] and len(seen["pil"]) == len(pil)
        assert_within_resize_tolerance(ours, pil)


def test_decode_time_bad_files_take_the_pil_path(caplog, monkeypatch):
    """Without the pre-scan: JPEGs (CMYK too) go through decode_jpeg even in a batch where one fails;
    non-JPEG files are read by Pillow; unreadable ones are named once each and skipped."""
    via_pil = []
    real = nvj.load_rgb_or_reason

    def spy(path, strict):
        via_pil.append(Path(path).name)
        return real(path, strict)
    monkeypatch.setattr(nvj, "load_rgb_or_reason", spy)
    with caplog.at_level(logging.WARNING, logger="mae_fast.data"):
        ld = make(BAD, verify="none", batch_size=5, shuffle=False)
        got = torch.cat(list(ld))
    assert sorted(via_pil) == sorted(UNREADABLE + NOT_JPEG)
    msgs = [r.getMessage() for r in caplog.records]
    for name in UNREADABLE:
        assert sum(name in m for m in msgs) == 1, name
    assert any("epoch 0: 3 unreadable image(s) skipped (0 found before training, 3 while decoding" in m
               for m in msgs)
    want = torch.cat(list(make(BAD, "pil", verify="none", batch_size=5, shuffle=False)))
    assert_within_resize_tolerance(got, want)  # crops are keyed by the file's index in the list


def test_strict_stops_at_the_unreadable_file():
    ld = make(BAD, verify="none", strict=True, shuffle=False, batch_size=4)
    with pytest.raises(UnreadableImageError, match="empty.jpg"):
        list(ld)
    assert not any(t.name == "mae-prefetch" for t in threading.enumerate())


def test_prefetch_break_and_continue():
    """Leaving a pass early stops the prefetch thread; iterating again continues the epoch."""
    ref = list(make(batch_size=4))
    ld = make(batch_size=4)
    for i, _ in enumerate(ld):
        if i == 1:
            break
    assert not any(t.name == "mae-prefetch" for t in threading.enumerate())
    rest = list(ld)
    assert len(rest) == 3
    for got, want in zip(rest, ref[2:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ld.close()


def test_labels_follow_the_decoded_files(tmp_path):
    for f in sorted(demo_dir().glob("*.jpg"))[:6]:
        (tmp_path / f.stem).mkdir()
        (tmp_path / f.stem / f.name).write_bytes(f.read_bytes())
    (tmp_path / "zz_bad").mkdir()
    (tmp_path / "zz_bad" / "bad.jpg").write_bytes((BAD / "truncated.jpg").read_bytes())
    pil = make(tmp_path, "pil", with_labels=True, batch_size=7, verify="none", shuffle=False)
    ours = make(tmp_path, with_labels=True, batch_size=7, verify="none", shuffle=False)
    (xp, lp), (xo, lo) = next(iter(pil)), next(iter(ours))
    assert lo.tolist() == lp.tolist() == list(range(6))
    assert_within_resize_tolerance(xo, xp)


def test_auto_choice(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(data, "_AUTO_LOGGED", True)
    monkeypatch.setattr(nvj, "nvjpeg_problem", lambda device: None)
    monkeypatch.setattr(data.dali_loader, "dali_available", lambda: True)
    assert resolve_kind("auto", cuda) == "dali"
    monkeypatch.setattr(data.dali_loader, "dali_available", lambda: False)
    assert resolve_kind("auto", cuda) == "nvjpeg"
    monkeypatch.setattr(nvj, "nvjpeg_problem", lambda device: "no nvJPEG in this build")
    assert resolve_kind("auto", cuda) == "pil"
    assert resolve_kind("auto", torch.device("cpu")) == "pil"
    assert resolve_kind("nvjpeg", torch.device("cpu")) == "nvjpeg"


def test_device_that_cannot_decode_is_one_clear_error(monkeypatch):
    assert nvjpeg_problem("cpu") is None
    assert "decodes on cpu or cuda, not meta" in nvjpeg_problem("meta")

    def no_nvjpeg(*a, **k):
        raise RuntimeError("torchvision not compiled with nvJPEG support\nmore")
    monkeypatch.setattr(nvj, "decode_jpeg", no_nvjpeg)
    monkeypatch.setattr(nvj, "_PROBLEMS", {})
    with pytest.raises(ValueError, match=r"the nvjpeg loader cannot run here: torchvision \S+ cannot decode "
                                         r"JPEG on cpu: torchvision not compiled with nvJPEG support \(use "
                                         r"--loader pil\)$"):
        nvj.NvJPEGLoader(scan_images("demo"), 4, 32)


def test_loader_benchmark_reports_images_per_core(tmp_path):
    from mae_fast.bench.loader import main

    rows = main(["--loader", "all", "--data", "demo", "--batch-size", "4", "--img-size", "32", "--steps", "2",
                 "--warmup", "1", "--workers", "1", "--device", "cpu", "--no-save"])
    assert [r["loader"] for r in rows][:3] == ["synthetic", "pil", "nvjpeg"]
    for r in rows[1:]:
        assert r["images"] == 8 and r["cpu_seconds"] > 0 and r["images_per_s_per_core"] > 0, r
    assert rows[2]["decode_device"] == "cpu"
    listing = tmp_path / "list.txt"
    assert main(["--data", "demo", "--repeat", "3", "--write-list", str(listing)]) == []
    assert len(listing.read_text().split()) == 3 * 19


def test_loader_benchmark_keeps_the_other_rows_when_one_loader_cannot_run(monkeypatch):
    """The GPU suite's loader step on a torchvision without nvJPEG: that row names why, pil is still timed, and
    ``python -m mae_fast.bench.loader`` exits 1."""
    import subprocess
    import sys

    from mae_fast.bench.loader import main

    monkeypatch.setattr(nvj, "_PROBLEMS", {"cpu": "torchvision 0.0 cannot decode JPEG on cpu: no nvJPEG"})
    rows = main(["--loader", "all", "--data", "demo", "--batch-size", "4", "--img-size", "32", "--steps", "1",
                 "--warmup", "1", "--workers", "1", "--device", "cpu", "--no-save"])
    by = {r["loader"]: r for r in rows}
    assert by["pil"]["images"] == 4 and "error" not in by["pil"]
    assert by["nvjpeg"] == {"loader": "nvjpeg", "error": "ValueError: the nvjpeg loader cannot run here: torchvision "
                            "0.0 cannot decode JPEG on cpu: no nvJPEG (use --loader pil)"}
    code = ("import sys, mae_fast.train.data.nvjpeg_loader as n; n._PROBLEMS['cpu'] = 'no nvJPEG'; "
            "sys.argv = ['loader', '--loader', 'nvjpeg', '--device', 'cpu', '--steps', '1', '--warmup', '1', "
            "'--img-size', '32', '--batch-size', '4']; import runpy; runpy.run_module('mae_fast.bench.loader', "
            "run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "nvjpeg     FAILED: ValueError: the nvjpeg loader cannot run here" in out.stdout, out


# ------------------------------------------------------------------ GPU (skipped without CUDA)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_decode_agrees_with_pil(monkeypatch):
    monkeypatch.setattr(data, "_AUTO_LOGGED", False)
    monkeypatch.setattr(data.dali_loader, "dali_available", lambda: False)
    auto = make(kind="auto", device="cuda")
    assert auto.kind == "nvjpeg" and auto.decode_device.type == "cuda"
    gpu = torch.cat(list(auto))
    assert gpu.device.type == "cuda"
    pil = torch.cat(list(make(kind="pil"))).to("cuda")
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels
    assert_within_resize_tolerance(gpu, pil, max_levels=80, mean_levels=2.0, frac_over_2=0.25)
    bad = torch.cat(list(make(BAD, device="cuda", batch_size=4, shuffle=False)))
    ref = torch.cat(list(make(BAD, "pil", batch_size=4, shuffle=False))).to("cuda")
    assert_within_resize_tolerance(bad, ref, max_levels=80, mean_levels=2.0, frac_over_2=0.25)
    # the same crops and resize with the decode on the CPU: what is left is the decoders' difference
    cpu_decoded = nvj.NvJPEGLoader(scan_images("demo"), 8, 32, device="cuda", decode_device="cpu")
    assert (levels(gpu) - levels(torch.cat(list(cpu_decoded)))).abs().mean() < 1.5


@needs_cuda
def test_cuda_prefetch_on_side_stream_is_deterministic():
    a = torch.cat(list(make(device="cuda", dtype=torch.bfloat16, batch_size=5, img_size=224)))
    b = torch.cat(list(make(device="cuda", dtype=torch.bfloat16, batch_size=5, img_size=224)))
    assert a.dtype == torch.bfloat16 and a.shape == (19, 3, 224, 224)
    torch.testing.assert_close(a, b, rtol=0, atol=0)

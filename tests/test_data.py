"""Data pipeline tests (CPU): loaders, sharding, bad files, determinism, resume. The nvjpeg loader runs
here with its decode on the CPU (the same code as on a GPU); tests/test_nvjpeg.py compares it with PIL."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_fast.train.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, load_rgb, normalize,
                                    sample_params, sample_params_batch)
from mae_fast.train.data.dali_loader import dali_available
from mae_fast.train.data.loaders import build_loader
from mae_fast.train.data.loader_base import epoch_order, sample_seed, seeded_rngs
from mae_fast.train.data.sources import demo_dir, list_images, scan_images
from mae_fast.errors import NoReadableImagesError, UnreadableImageError

BAD = Path(__file__).parent / "assets" / "bad"
UNREADABLE = ["empty.jpg", "not_an_image.jpg", "truncated.jpg"]
READABLE = ["cmyk.jpg", "extreme_aspect_1200x40.jpg", "grayscale.jpg", "png_named_jpg.jpg",
            "rgba.png", "tiny_7x5.jpg"]
N_DEMO = 19
S = 32
needs_dali = pytest.mark.skipif(not dali_available(),
                                reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda130)")
KINDS = ["pil", "nvjpeg", pytest.param("dali", marks=needs_dali)]


def make(source="demo", kind="pil", **kw):
    kw = {"batch_size": 8, "img_size": S, "device": "cpu", "num_workers": 0, **kw}
    return build_loader(source, kind=kind, **kw)


def collect(loader) -> torch.Tensor:
    return torch.cat(list(loader))


@pytest.fixture(scope="module")
def per_file_classes(tmp_path_factory) -> Path:
    """ImageFolder tree with one demo image per class: the label identifies the file."""
    root = tmp_path_factory.mktemp("classes")
    for f in sorted(demo_dir().glob("*.jpg")):
        (root / f.stem).mkdir()
        shutil.copy(f, root / f.stem / f.name)
    return root


# ------------------------------------------------------------------ augmentation
def test_demo_images_bundled():
    assert len(list(demo_dir().glob("*.jpg"))) == N_DEMO


def test_crop_params_follow_random_resized_crop():
    n = 4000
    W, H = np.full(n, 500), np.full(n, 375)
    boxes, flips = sample_params_batch(W, H, seed=3, epoch=1, index=np.arange(n))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    frac = h * w / (500 * 375)
    assert frac.min() > 0.19 and frac.max() <= 1.0
    assert 0.45 < flips.mean() < 0.55
    ratio = w / h
    assert ratio.min() > 0.74 and ratio.max() < 1.35
    # same distribution as torchvision's RandomResizedCrop(scale=(0.2, 1)) on this size
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    img = torch.empty(3, 375, 500)
    ref = np.array([RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(n)])
    assert abs(frac.mean() - (ref[:, 2] * ref[:, 3] / (500 * 375)).mean()) < 0.02
    # one sample at a time gives the same as the batch, and it is a pure function of the key
    assert sample_params(500, 375, 3, 1, 7) == (tuple(boxes[7]), bool(flips[7]))
    assert sample_params(500, 375, 3, 2, 7) != sample_params(500, 375, 3, 1, 7)
    assert sample_params(7, 5, 0, 0, 0)[0][2:] <= (5, 7)  # tiny image: box inside it


def test_normalize_matches_imagenet_constants():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x), (x.float() / 255 - mean) / std)
    assert normalize(x, torch.bfloat16).dtype == torch.bfloat16


# ------------------------------------------------------------------ loaders
@pytest.mark.parametrize("kind", KINDS)
def test_loader_yields_normalized_batches(kind):
    ld = make(kind=kind)
    assert len(ld) == 3 and ld.kind == kind
    batches = list(ld)
    assert [b.shape for b in batches] == [(8, 3, S, S)] * 2 + [(3, 3, S, S)]
    x = torch.cat(batches)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (x.amin((0, 2, 3)) >= lo - 0.05).all() and (x.amax((0, 2, 3)) <= hi + 0.05).all()
    assert x.mean().abs() < 0.5 and 0.6 < x.std() < 1.6
    assert ld.epoch == 1 and ld.batch == 0  # advanced after a full pass


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_and_labels(kind, per_file_classes):
    ld = make(per_file_classes, kind=kind, dtype=torch.bfloat16, with_labels=True)
    images, labels = next(iter(ld))
    assert images.dtype == torch.bfloat16 and labels.dtype == torch.long
    assert images.shape == (8, 3, S, S) and labels.shape == (8,)


@needs_dali
def test_dali_cpu_pipeline_agrees_with_pil():
    pil, dali = collect(make(kind="pil")), collect(make(kind="dali", num_workers=2))
    assert pil.shape == dali.shape
    torch.testing.assert_close(dali.mean((0, 2, 3)), pil.mean((0, 2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(dali.std((0, 2, 3)), pil.std((0, 2, 3)), atol=0.01, rtol=0)
    # same files, same crops: pixels agree up to decoder / resampling differences
    assert (dali - pil).abs().mean() < 0.02
    kw = dict(batch_size=6, shuffle=False)  # odd inputs (CMYK, gray, RGBA, PNG bytes, tiny) too
    pil, dali = next(iter(make(BAD, **kw))), next(iter(make(BAD, kind="dali", **kw)))
    assert ((dali - pil).abs().mean((1, 2, 3)) < 0.03).all()


def test_synthetic_loader():
    ld = build_loader(None, kind="synthetic", batch_size=4, img_size=S, device="cpu",
                      num_batches=5, dtype=torch.bfloat16)
    xs = list(ld)
    assert len(ld) == 5 and len(xs) == 5
    assert xs[0].shape == (4, 3, S, S) and xs[0].dtype == torch.bfloat16


def test_auto_is_pil_without_gpu(caplog):
    import mae_fast.train.data.loaders as data
    data._AUTO_LOGGED = False
    with caplog.at_level(logging.INFO, logger="mae_fast.data"):
        a = make(kind="auto")
        make(kind="auto")
    assert a.kind == "pil"
    assert sum("data loader:" in r.message for r in caplog.records) == 1


def test_pil_workers_match_in_process():
    a = collect(make(num_workers=0, seed=5))
    b = collect(make(num_workers=1, seed=5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_given_seed(kind):
    a, b = collect(make(kind=kind, seed=1)), collect(make(kind=kind, seed=1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, collect(make(kind=kind, seed=2)))
    ld = make(kind=kind, seed=1)
    ld.set_epoch(1)
    assert not torch.equal(a, collect(ld))  # new order and crops each epoch


@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_epoch(kind):
    ref = make(kind=kind, batch_size=4, seed=7)
    ref.set_epoch(2)
    full = list(ref)  # 5 batches
    ld = make(kind=kind, batch_size=4, seed=7)
    ld.set_epoch(2)
    it = iter(ld)
    torch.testing.assert_close(next(it), full[0], rtol=0, atol=0)
    next(it)
    state = ld.state_dict()
    assert (state["epoch"], state["batch"]) == (2, 2)
    resumed = make(kind=kind, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calling set_epoch keeps the restored position
    rest = list(resumed)
    assert len(rest) == 3
    for got, want in zip(rest, full[2:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert resumed.state_dict()["epoch"] == 3


@pytest.mark.parametrize("kind,workers", [("pil", 0), ("pil", 1), ("nvjpeg", 1)])
def test_iterating_draws_nothing_from_the_global_rngs(kind, workers):
    """Starting a pass mid-epoch (as after a resume) leaves torch, numpy and python RNG states alone."""
    import random

    ld = make(kind=kind, num_workers=workers, batch_size=4)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(6)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    for i, _ in enumerate(ld):
        if i == 1:
            break
    list(ld)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    if hasattr(ld, "close"):
        ld.close()


def test_sample_seeding_repeats_and_touches_only_the_cpu_generator(monkeypatch):
    """seeded_rngs (each labelled or shard sample's augmentation) gives the same draws for a seed, puts the CPU
    state back and never reseeds a CUDA generator (torch.manual_seed would: the model's drop path draws there)."""
    import random

    def cuda_seeded(seed):
        raise AssertionError(f"a sample's seeding reseeded the CUDA generators ({seed})")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeded)
    before = torch.get_rng_state(), random.getstate()
    draws = []
    for _ in range(2):
        with seeded_rngs(sample_seed(3, 1, 17)):
            draws.append((torch.rand(4), random.random(), np.random.rand()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1:] == draws[1][1:]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]


def test_pil_workers_break_and_continue():
    """Leaving a pass early and iterating again continues the epoch (persistent workers)."""
    ref = list(make(batch_size=4, num_workers=1))
    ld = make(batch_size=4, num_workers=1)
    for i, x in enumerate(ld):
        if i == 1:
            break
    rest = list(ld)
    assert len(rest) == 3
    for got, want in zip(rest, ref[2:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ld.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_cover_every_file_once(kind, drop_last, per_file_classes):
    seen = []
    lens = []
    for rank in range(2):
        ld = make(per_file_classes, kind=kind, batch_size=4, rank=rank, world_size=2,
                  with_labels=True, drop_last=drop_last, seed=11)
        ld.set_epoch(3)
        labels = [lab for _, lab in ld]
        lens.append(len(labels))
        assert len(labels) == len(ld)
        seen += torch.cat(labels).tolist()
    assert len(seen) == len(set(seen))  # no file twice
    if drop_last:
        assert lens[0] == lens[1] == (N_DEMO // 2) // 4
    else:
        assert sorted(seen) == list(range(N_DEMO))  # every file once
        assert sorted(lens) == [3, 3]


def test_epoch_order_shards_partition():
    shards = [epoch_order(103, seed=0, epoch=4, rank=r, world_size=4) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(103))
    assert epoch_order(103, 0, 4) != epoch_order(103, 0, 5)


# ------------------------------------------------------------------ sources and bad input
def test_sources_flat_imagefolder_and_list(tmp_path, per_file_classes):
    paths, labels, classes = list_images(per_file_classes)
    assert len(paths) == N_DEMO and labels == list(range(N_DEMO)) and len(classes) == N_DEMO
    paths, labels, classes = list_images("demo")
    assert len(paths) == N_DEMO and set(labels) == {-1} and classes == []
    (tmp_path / "sub").mkdir()
    shutil.copy(demo_dir() / "astronaut.jpg", tmp_path / "sub" / "a.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nsub/a.jpg\t4\n{demo_dir() / 'coffee.jpg'}\n\n")
    paths, labels, _ = list_images(lst)
    assert paths == [str(tmp_path / "sub" / "a.jpg"), str(demo_dir() / "coffee.jpg")]
    assert labels == [4, -1]
    assert len(collect(make(lst, batch_size=2))) == 2


def test_readable_odd_images_become_rgb(tmp_path):
    for name in READABLE:
        img = load_rgb(str(BAD / name))
        assert img.mode == "RGB", name
    assert Image.open(BAD / "cmyk.jpg").mode == "CMYK"
    Image.fromarray(np.full((6, 6), 60000, np.uint16)).save(tmp_path / "g16.png")
    pal = Image.new("P", (6, 6))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    g16 = load_rgb(str(tmp_path / "g16.png"))
    assert g16.mode == "RGB" and g16.getpixel((0, 0)) == (233, 233, 233)  # scaled, not clipped
    assert load_rgb(str(tmp_path / "pal.png")).mode == "RGB"


@pytest.mark.parametrize("kind", KINDS)
def test_bad_folder_skips_unreadable_files_with_warnings(kind, caplog):
    with caplog.at_level(logging.WARNING, logger="mae_fast.data"):
        ld = make(BAD, kind=kind, batch_size=4)
        x = collect(ld)
    assert x.shape == (len(READABLE), 3, S, S) and torch.isfinite(x).all()
    msgs = [r.getMessage() for r in caplog.records]
    for name in UNREADABLE:
        assert sum(name in m for m in msgs) == 1, name
    for name in READABLE:
        assert not any(name in m for m in msgs), name
    assert any("epoch 0: 3 unreadable image(s) skipped" in m for m in msgs)
    assert sorted(Path(p).name for p, _ in ld.skipped) == UNREADABLE


@pytest.mark.parametrize("kind", KINDS)
def test_bad_folder_strict_names_the_file(kind):
    with pytest.raises(UnreadableImageError, match="empty.jpg"):
        make(BAD, kind=kind, strict=True)


def test_strict_scan_error_names_the_file_and_the_flags():
    """One line naming the file and the command-line flags (not the Python argument strict=...)."""
    with pytest.raises(UnreadableImageError) as e:
        scan_images(BAD, strict=True)
    msg = str(e.value)
    assert "\n" not in msg and repr(str(BAD / "empty.jpg")) in msg and "strict=" not in msg
    assert msg.endswith("(--strict-data; drop it or pass --no-strict-data to skip unreadable files with a warning)")
    from mae_fast.train.data.transforms import load_rgb_or_reason

    with pytest.raises(UnreadableImageError) as e:  # a file failing only at decode time says the same
        load_rgb_or_reason(str(BAD / "empty.jpg"), strict=True)
    assert "strict=" not in str(e.value) and str(e.value).endswith("to skip unreadable files with a warning)")


def test_truncated_file_caught_by_fast_scan():
    out = scan_images(BAD)
    reasons = dict(out.skipped)
    assert "truncated" in reasons[str(BAD / "truncated.jpg")]
    assert dict(zip(map(lambda p: Path(p).name, out.paths), out.sizes))["tiny_7x5.jpg"] == (7, 5)


def test_pil_skips_files_failing_at_decode_time(caplog):
    """With the pre-scan off, workers report unreadable files instead of crashing."""
    with caplog.at_level(logging.WARNING, logger="mae_fast.data"):
        ld = make(BAD, verify="none", batch_size=4, num_workers=1)
        x = collect(ld)
    assert x.shape[0] == len(READABLE)
    msgs = [r.getMessage() for r in caplog.records]
    for name in UNREADABLE:
        assert sum(name in m for m in msgs) == 1, name
    assert any("epoch 0: 3 unreadable image(s) skipped (0 found before training, 3 while "
               "decoding" in m for m in msgs)
    with pytest.raises(UnreadableImageError, match="empty.jpg"):
        collect(make(BAD, verify="none", strict=True, shuffle=False))


@pytest.mark.parametrize("kind", KINDS)
def test_missing_empty_or_imageless_source_fails_at_start(kind, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make(tmp_path / "nope", kind=kind)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images found in .*empty.*\.jpg, \.jpeg"):
        make(tmp_path / "empty", kind=kind)
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "readme.txt").write_text("hi")
    (tmp_path / "docs" / "sub" / "notes.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match="no images found"):
        make(tmp_path / "docs", kind=kind)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    shutil.copy(BAD / "empty.jpg", only_bad / "empty.jpg")
    with pytest.raises(RuntimeError, match="could be read"):
        make(only_bad, kind=kind)


@pytest.fixture
def only_bad(tmp_path) -> Path:
    folder = tmp_path / "only_bad"
    folder.mkdir()
    for name in UNREADABLE:
        shutil.copy(BAD / name, folder / name)
    return folder


def test_source_of_only_unreadable_files_is_one_line(only_bad, tmp_path, capsys):
    from mae_fast.train.pretrain import main

    rc = main(["--data", str(only_bad), "--model", "mae_vit_tiny_patch8", "--img-size", "32", "--loader", "pil",
               "--num-workers", "0", "--no-progress", "--no-tensorboard", "--output-dir", str(tmp_path / "run")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"mae-pretrain: error: none of the 3 image file(s) in {str(only_bad)!r} could be read "
                       f"(each is named in a warning above)")
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("kind", ["pil", "nvjpeg"])
def test_epoch_of_only_unreadable_files_stops_naming_the_source(kind, only_bad):
    """Without the pre-scan every file fails at decode time: the epoch stops instead of yielding nothing."""
    ld = make(only_bad, kind=kind, verify="none", batch_size=2)
    with pytest.raises(NoReadableImagesError,
                       match=r"none of the 3 image file\(s\) of '.*only_bad' read in epoch 0 could be decoded"):
        list(ld)


def test_scan_cache_round_trip(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = scan_images(BAD, cache=True)
    assert len(list((tmp_path / "mae_fast" / "scans").glob("*.json"))) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mae_fast.data"):
        second = scan_images(BAD, cache=True)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("loaded from" in m for m in msgs)
    assert sum("truncated.jpg" in m for m in msgs) == 1  # still warned on every start
    assert (second.paths, second.sizes, second.skipped) == (first.paths, first.sizes, first.skipped)
    with pytest.raises(UnreadableImageError, match="empty.jpg"):
        scan_images(BAD, cache=True, strict=True)


def test_image_file_as_source_is_rejected():
    with pytest.raises(ValueError, match="is an image file"):
        make(demo_dir() / "coffee.jpg")


def test_labels_required_but_missing():
    with pytest.raises(ValueError, match="no labels"):
        make("demo", with_labels=True)


def test_dali_missing_message(monkeypatch):
    import mae_fast.train.data.dali_loader as dl
    monkeypatch.setattr(dl, "dali_available", lambda: False)
    with pytest.raises(ImportError, match="pip install nvidia-dali-cuda130"):
        make(kind="dali")


# ------------------------------------------------------------------ GPU (skipped without CUDA)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_pil_loader_to_cuda_bf16():
    x = next(iter(make(device="cuda", dtype=torch.bfloat16)))
    assert x.device.type == "cuda" and x.dtype == torch.bfloat16 and x.shape == (8, 3, S, S)


@needs_cuda
@needs_dali
def test_dali_gpu_decoding_agrees_with_pil():
    import mae_fast.train.data.loaders as data
    data._AUTO_LOGGED = False
    auto = make(kind="auto", device="cuda")
    assert auto.kind == "dali"
    dali, pil = collect(auto), collect(make(kind="pil", device="cuda"))
    assert dali.device.type == "cuda" and dali.shape == pil.shape
    torch.testing.assert_close(dali.mean((0, 2, 3)), pil.mean((0, 2, 3)), atol=0.02, rtol=0)
    assert (dali - pil).abs().mean() < 0.03
    bad = collect(make(BAD, kind="dali", device="cuda", batch_size=4))  # CMYK, PNG, ... on nvJPEG
    assert bad.shape == (len(READABLE), 3, S, S) and torch.isfinite(bad).all()
    ref = collect(make(BAD, kind="pil", device="cuda", batch_size=4))
    assert (bad - ref).abs().mean() < 0.05

"""Tar shards (WebDataset layout) on CPU: mae-make-shards, source forms, the order (every sample once,
the same global order for any world size dividing the streams), the PIL and DALI shard loaders (exact
samples, exact resume, bad samples named by shard and key), labels from .cls, and training from shards."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

wds = pytest.importorskip("webdataset", reason="tar shards need webdataset (not installed)")

from mae_fast.train.data.transforms import augment_pil, load_rgb, normalize, sample_params
from mae_fast.train.data.dali_loader import dali_available
from mae_fast.train.make_shards import MakeShardsConfig, make_shards, parse, parse_size
from mae_fast.errors import ConfigError
from mae_fast.train.data.shard_loaders import build_labelled_shard_loader, build_shard_loader
from mae_fast.train.data.shards import is_shard_source, list_shards, rank_rows, scan_shards, stream_blocks
from mae_fast.errors import ShardError
from mae_fast.train.data.sources import demo_dir
from mae_fast.errors import UnreadableImageError

S = 32
BAD = Path(__file__).parent / "assets" / "bad"
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not installed")
KINDS = ["pil", pytest.param("dali", marks=needs_dali)]


def image_folder(root: Path) -> Path:
    """The 19 demo photos as an ImageFolder tree with two classes."""
    files = sorted(demo_dir().glob("*.jpg"))
    for i, f in enumerate(files):
        d = root / ("even" if i % 2 == 0 else "odd")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d / f.name)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("shards")
    out = make_shards(MakeShardsConfig(src=str(tree), dst=str(dst), max_count=5, progress=False))
    assert (out["images"], out["shards"], out["classes"]) == (19, 4, 2)
    return dst


def source_image(tree: Path, key: str) -> Path:
    return next(tree.glob(key + ".*"))


# ------------------------------------------------------------------ mae-make-shards
def test_make_shards_writes_labels_and_reports(tree, shards, tmp_path, capsys):
    samples = list(wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False))
    assert len(samples) == 19 and len({s["__key__"] for s in samples}) == 19
    classes = (shards / "classes.txt").read_text().split()
    assert classes == ["even", "odd"]
    for s in samples:
        cls_dir = s["__key__"].split("/")[0]
        assert int(s["cls"]) == classes.index(cls_dir)
        assert s["jpg"] == source_image(tree, s["__key__"]).read_bytes()  # copied byte for byte
    assert [s["__key__"] for s in samples] != sorted(s["__key__"] for s in samples)  # shuffled
    # by size: a new shard once one reaches 200 kB; the command line reports counts
    from mae_fast.train.make_shards import main

    assert main([str(tree), str(tmp_path / "by_size"), "--shard-size", "200kB", "--no-progress"]) == 0
    err = capsys.readouterr().err
    n = len(list((tmp_path / "by_size").glob("*.tar")))
    assert n > 2 and f"wrote 19 images in {n} shard(s)" in err and "2 classes" in err
    assert main([str(tree), str(tmp_path / "by_size"), "--no-progress"]) == 2  # holds shards already
    assert "--overwrite" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size("1.5k") == 1500
    with pytest.raises(ConfigError, match="--shard-size '1 parsec'"):
        parse_size("1 parsec")
    assert parse(["a", "b", "--shard-size", "2GB"]).shard_size == "2GB"


def test_source_forms(shards, tmp_path):
    files = sorted(str(p) for p in shards.glob("*.tar"))
    pattern = str(shards / "shard-{000000..000003}.tar")
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\n" + "\n".join(Path(f).name for f in files) + "\n")
    shutil.copy(files[0], tmp_path / files[0].split("/")[-1])
    for f in files[1:]:
        shutil.copy(f, tmp_path)
    for src in (shards, pattern, listing):
        assert is_shard_source(src)
        assert [Path(p).name for p in list_shards(src)] == [Path(f).name for f in files]
    assert list_shards(files[2]) == [files[2]]
    assert not is_shard_source("demo") and not is_shard_source(demo_dir())
    with pytest.raises(ShardError, match=r"1 of 5 shard\(s\) do not exist, e.g. '.*shard-000004.tar'"):
        list_shards(str(shards / "shard-{000000..000004}.tar"))


# ------------------------------------------------------------------ order
def global_order(ss, seed, epoch, streams, world, block):
    """Reassemble the global sequence from the ranks' rows (rank r holds positions r, r + W, ...)."""
    rows = [rank_rows(ss, seed, epoch, streams, r, world, block) for r in range(world)]
    out = np.empty(sum(map(len, rows)), dtype=np.int64)
    for r, x in enumerate(rows):
        out[r::world] = x
    return out


def test_order_every_sample_once_and_world_size_independent(shards):
    ss = scan_shards(shards)
    ref = global_order(ss, 3, 0, 4, 1, block=3)
    assert sorted(ref.tolist()) == list(range(19))
    for world in (2, 4):
        assert np.array_equal(global_order(ss, 3, 0, 4, world, block=3), ref), world
    assert not np.array_equal(global_order(ss, 3, 1, 4, 1, block=3), ref)  # a new order each epoch
    assert not np.array_equal(global_order(ss, 4, 0, 4, 1, block=3), ref)  # ... and seed
    for world in (1, 2, 3):  # one stream per rank: each rank reads only its own shards' runs
        rows = [rank_rows(ss, 0, 0, world, r, world, 3) for r in range(world)]
        assert sorted(np.concatenate(rows).tolist()) == list(range(19))
        assert max(map(len, rows)) - min(map(len, rows)) <= 1
    # no shuffle: shard order, then sample order
    assert rank_rows(ss, 0, 0, 1, 0, 1, 3, shuffle=False).tolist() == list(range(19))
    # a block never spans two shards, and holds at most `block` samples
    for v in range(4):
        for b in stream_blocks(ss, 3, 0, 4, v, block=3):
            assert len(b.perm) <= 3 and b.first + len(b.perm) <= ss.counts[b.shard]


# ------------------------------------------------------------------ loaders
def make(shards, kind="pil", **kw):
    kw = {"batch_size": 4, "img_size": S, "device": "cpu", "num_workers": 0, "block": 3, **kw}
    return build_shard_loader(str(shards), kind, **kw)


def test_pil_batches_are_the_augmented_source_images(tree, shards):
    loader = make(shards, with_labels=True, seed=5)
    loader.set_epoch(1)
    order = loader.order(1)
    images, labels = (torch.cat(t) for t in zip(*list(loader)))
    ss = loader.images
    for row, gid in enumerate(order):
        img = load_rgb(str(source_image(tree, ss.keys[gid])))
        box, flip = sample_params(img.width, img.height, 5, 1, gid)
        expected = normalize(augment_pil(img, S, box, flip)[None])[0]
        torch.testing.assert_close(images[row], expected, rtol=0, atol=0)
        assert labels[row] == ss.labels[gid]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_mid_epoch_is_exact(shards, kind):
    opts = dict(batch_size=2, seed=1, streams=2, drop_last=True)
    ref = make(shards, kind, **opts)
    ref_batches = [b.clone() for _ in range(2) for b in ref]  # epochs 0 and 1
    n = len(ref)
    for stop in ([1, 2, 3, 4, 5, 6, 7, 8] if kind == "pil" else [3]):  # inside and at block boundaries
        part = make(shards, kind, **opts)
        it = iter(part)
        first = [next(it).clone() for _ in range(stop)]
        state = part.state_dict()
        assert state["batch"] == stop and state["streams"] == 2 and len(state["position"]) == 2
        resumed = make(shards, kind, **opts)
        resumed.load_state_dict(state)
        # reading starts at the resume point (shard + offset): fewer samples left to read
        left = sum(len(b.perm) for p in resumed.stream_plan(0, stop) for b in p)
        assert left == 19 - 2 * stop, stop
        got = first + [b.clone() for b in resumed] + [b.clone() for b in resumed]
        assert len(got) == len(ref_batches) == 2 * n
        for i, (a, b) in enumerate(zip(ref_batches, got)):
            assert torch.equal(a, b), (stop, i)


def test_resume_on_another_world_size_with_fixed_streams(shards):
    """Saved by 1 process x 4 images, resumed by 2 processes x 2 images (2 streams): exact."""
    one = make(shards, batch_size=4, streams=2, drop_last=True)
    batches = [b.clone() for b in one]
    part = make(shards, batch_size=4, streams=2, drop_last=True)
    it = iter(part)
    next(it)
    state = part.state_dict()
    rest = []
    for rank in range(2):
        loader = make(shards, batch_size=2, streams=2, drop_last=True, rank=rank, world_size=2)
        loader.load_state_dict(state)
        rest.append([b.clone() for b in loader])
    assert len(rest[0]) == len(rest[1]) == len(batches) - 1
    for want, a, b in zip(batches[1:], *rest):
        assert torch.equal(want[0::2], a) and torch.equal(want[1::2], b)  # rank r holds rows r, r + 2, ...


@needs_dali
def test_dali_agrees_with_pil_two_streams_per_process(shards):
    pil = list(make(shards, "pil", with_labels=True, streams=2, seed=2))
    dali = list(make(shards, "dali", with_labels=True, streams=2, seed=2))
    assert [y.tolist() for _, y in pil] == [y.tolist() for _, y in dali]  # same samples, same order
    a, b = torch.cat([x for x, _ in pil]), torch.cat([x for x, _ in dali])
    assert a.shape == b.shape == (19, 3, S, S)
    assert (a - b).abs().mean() < 0.02  # same crops; decoders and resamplers differ slightly
    with pytest.raises(ShardError, match="--batch-size 3 must be a multiple of 2"):
        make(shards, "dali", batch_size=3, streams=2)


@pytest.fixture
def bad_shard(tmp_path) -> Path:
    """Readable demo photos mixed with the bad files of tests/assets/bad, and a sample without image."""
    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for i, f in enumerate(sorted(demo_dir().glob("*.jpg"))[:4]):
            w.write({"__key__": f"good{i}", "jpg": f.read_bytes(), "cls": 0})
        for f in sorted(BAD.iterdir()):
            w.write({"__key__": f.stem, f.suffix[1:]: f.read_bytes(), "cls": 1})
        w.write({"__key__": "no_image", "txt": b"caption only", "cls": 1})
    return path


def test_bad_samples_named_by_shard_and_key(bad_shard, caplog):
    caplog.set_level(logging.WARNING, "mae_fast.data")
    ss = scan_shards(bad_shard, cache=False)
    skipped = dict(ss.skipped)
    name = lambda key: f"{bad_shard} (sample {key})"  # noqa: E731
    assert set(skipped) == {name("empty"), name("not_an_image"), name("truncated"), name("no_image")}
    assert "no image member" in skipped[name("no_image")]
    assert all(any(n in r.getMessage() for r in caplog.records) for n in skipped)
    assert len(ss) == 4 + 6  # CMYK, grayscale, RGBA, PNG named .jpg, tiny, extreme aspect are kept
    images = torch.cat(list(make(bad_shard, batch_size=5)))
    assert images.shape == (10, 3, S, S) and torch.isfinite(images).all()
    with pytest.raises(UnreadableImageError, match=r"bad-000000.tar \(sample empty\)"):
        scan_shards(bad_shard, strict=True, cache=False)
    # not screened when indexed (verify='none'): found while decoding, named once, the batch is smaller
    caplog.clear()
    loader = make(bad_shard, batch_size=20, verify="none")
    assert [len(b) for b in loader] == [10]
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert any("(sample truncated)" in m for m in warned) and any("(sample not_an_image)" in m for m in warned)


def test_labelled_shards_for_finetuning(tree, shards):
    from mae_fast.train.data.labelled import eval_transform

    ss = scan_shards(shards)
    seen = []
    for rank in range(2):  # evaluation: every sample once across ranks, in shard order
        loader = build_labelled_shard_loader(ss, eval_transform(S), 4, rank=rank, world_size=2,
                                             num_workers=0, training=False)
        for images, labels in loader:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, S, S)
            seen += labels.tolist()
    assert sorted(seen) == sorted(ss.labels) and len(seen) == 19
    assert ss.labels == [["even", "odd"].index(k.split("/")[0]) for k in ss.keys]


def test_index_cache(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = scan_shards(shards)
    cached = list((tmp_path / "mae_fast" / "shards").glob("*.json"))
    assert len(cached) == 4
    b = scan_shards(shards)
    assert a.keys == b.keys and np.array_equal(a.img_offset, b.img_offset)


# ------------------------------------------------------------------ the training commands
PRETRAIN = ["--model", "mae_vit_tiny_patch8", "--img-size", "32", "--num-workers", "0", "--warmup-epochs", "1",
            "--lr", "1e-3", "--no-progress", "--no-tensorboard", "--log-every", "1", "--device", "cpu",
            "--batch-size", "4", "--epochs", "1", "--precision", "fp32"]


@pytest.mark.parametrize("kind", KINDS)
def test_pretrain_from_shards(shards, tmp_path, kind):
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.pretrain import train

    pattern = str(shards / "shard-{000000..000003}.tar")
    summary = train(parse_config(PRETRAIN + ["--data", pattern, "--loader", kind, "--output-dir", str(tmp_path)]))
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    state = torch.load(summary["last_checkpoint"], weights_only=False)["loader"]
    assert (state["kind"], state["streams"], state["epoch"], state["batch"]) == (kind, 1, 0, 4)


@pytest.fixture(scope="module")
def labelled_shards(tree, tmp_path_factory) -> Path:
    """DATA/train and DATA/val shard folders (the same 19 photos, 2 classes)."""
    root = tmp_path_factory.mktemp("labelled_shards")
    for split in ("train", "val"):
        make_shards(MakeShardsConfig(src=str(tree), dst=str(root / split), max_count=6, progress=False))
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_and_linprobe_from_shards(labelled_shards, tmp_path, capsys, kind):
    import json

    from mae_fast.train import finetune, linprobe

    common = ["--model", "vit_tiny_patch8", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
              "--precision", "fp32", "--device", "cpu", "--no-progress", "--no-tensorboard", "--epochs", "1",
              "--warmup-epochs", "1", "--data", str(labelled_shards)]
    if kind == "pil":  # fine-tuning reads with PIL workers (timm augmentation) whatever --loader
        assert finetune.main(common + ["--output-dir", str(tmp_path / "ft")]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["steps"] == 4 and 0 <= summary["acc1"] <= 100
        assert finetune.main(common + ["--eval", "--resume", summary["last_checkpoint"],
                                       "--output-dir", str(tmp_path / "eval")]) == 0
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert metrics["images"] == 19 and metrics["acc1"] == pytest.approx(summary["acc1"])
    assert linprobe.main(common + ["--loader", kind, "--output-dir", str(tmp_path / "lp")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "linprobe" and summary["steps"] == 4

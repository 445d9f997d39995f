"""Progressive resolution in the loaders (Loader.follow): each epoch is read at the planned image size and
batch size, with the pixels of a loader built at that shape; len, batches_at and resume (mid-epoch, into a
loader built at epoch 0's shape) follow the plan. CPU only: the nvjpeg loader decodes on the CPU."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from test_data import make
from test_shards import make as make_shard_loader
from test_shards import shards, tree  # noqa: F401 - module fixtures: the demo photos as 4 tar shards

from mae_fast.errors import ShardError
from mae_fast.train.data import dali_loader
from mae_fast.train.data.labelled import LabelledLoader
from mae_fast.train.data.loaders import build_loader
from mae_fast.train.data.shard_loaders import ShardDALILoader
from mae_fast.train.data.shards import scan_shards
from mae_fast.train.data.sources import scan_source

N = 19  # demo images
EPOCHS = 3  # two epochs of the first phase, one of the second
SEED = 3
FOLDER_KINDS = [("pil", 0), ("pil", 2), ("nvjpeg", 1)]


def plan(epoch: int) -> tuple[int, int]:
    """(image side, batch size) of ``epoch``: two sizes and two batch sizes, none a power of two."""
    return (24, 6) if epoch < 2 else (40, 5)


def folder_loader(kind: str = "pil", workers: int = 0, epoch: int = 0, **kw):
    """A folder loader built at the plan's shape of ``epoch`` (no plan followed)."""
    size, batch = plan(epoch)
    return make(kind=kind, num_workers=workers, img_size=size, batch_size=batch, seed=SEED, **kw)


def shard_loader(source, workers: int = 0, epoch: int = 0, **kw):
    size, batch = plan(epoch)
    return make_shard_loader(source, img_size=size, batch_size=batch, seed=SEED, num_workers=workers, **kw)


def close(*loaders) -> None:
    for loader in loaders:
        if hasattr(loader, "close"):
            loader.close()


def assert_follows_plan(planned, unplanned, num_rows: int) -> None:
    """Read ``EPOCHS`` epochs from ``planned`` (no set_epoch: the loader advances itself) and compare each
    with ``unplanned(epoch)``, a loader built at that epoch's shape and set to that epoch."""
    for epoch in range(EPOCHS):
        size, batch = plan(epoch)
        n = math.ceil(num_rows / batch)
        assert (planned.epoch, planned.img_size, planned.batch_size, len(planned)) == (epoch, size, batch, n)
        got = list(planned)
        assert [tuple(b.shape) for b in got] == ([(batch, 3, size, size)] * (n - 1)
                                                 + [(num_rows - batch * (n - 1), 3, size, size)])
        ref = unplanned(epoch)
        ref.set_epoch(epoch)
        want = list(ref)
        close(ref)
        assert len(want) == len(got)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), (epoch, i)


# ------------------------------------------------------------------ shapes and pixels
@pytest.mark.parametrize("kind,workers", FOLDER_KINDS)
def test_folder_loader_reads_each_epoch_at_its_planned_shape(kind, workers):
    loader = folder_loader(kind, workers)
    loader.follow(plan)
    assert_follows_plan(loader, lambda e: folder_loader(kind, workers, e), N)
    loader.set_epoch(1)  # set_epoch takes the plan too: back to the first phase
    assert (loader.img_size, loader.batch_size, len(loader)) == (24, 6, 4)
    close(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_loader_reads_each_epoch_at_its_planned_shape(shards, workers):  # noqa: F811
    loader = shard_loader(shards, workers)
    loader.follow(plan)
    assert_follows_plan(loader, lambda e: shard_loader(shards, workers, e), N)
    close(loader)


def test_synthetic_loader_makes_its_batch_at_the_planned_shape():
    def synthetic(epoch: int, num_batches: int = 5):
        size, batch = plan(epoch)
        return build_loader(None, kind="synthetic", img_size=size, batch_size=batch, seed=SEED, device="cpu",
                            num_batches=num_batches)

    loader = synthetic(0)
    loader.follow(plan)
    rows = 5 * plan(0)[1]  # an epoch is num_batches batches of the construction-time size
    for epoch in range(EPOCHS):
        size, batch = plan(epoch)
        n = len(loader)
        assert n == math.ceil(rows / batch) == loader.batches_at(batch)
        got, want = list(loader), next(iter(synthetic(epoch)))
        assert len(got) == n and want.shape == (batch, 3, size, size)
        assert all(torch.equal(b, want) for b in got)


# ------------------------------------------------------------------ batches_at
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_at_is_len_of_a_loader_built_at_that_batch(shards, world_size, drop_last):  # noqa: F811
    builders = {"folder": lambda **kw: make(seed=SEED, **kw), "shards": lambda **kw: make_shard_loader(shards, **kw)}
    for name, build in builders.items():
        for rank in range(world_size):
            loader = build(batch_size=6, rank=rank, world_size=world_size, drop_last=drop_last)
            for batch in (1, 4, 5, 7, 9, 19):
                want = len(build(batch_size=batch, rank=rank, world_size=world_size, drop_last=drop_last))
                assert loader.batches_at(batch) == want, (name, rank, batch)
            assert (loader.batch_size, len(loader)) == (6, loader.batches_at(6))  # left as it was


# ------------------------------------------------------------------ resume
def assert_resumes_exactly(build, caplog, k: int = 2) -> None:
    """Stop a planned loader after ``k`` batches of epoch 2 (second phase), restore its state into a new
    loader built at epoch 0's shape that follows the plan: the rest of epoch 2 and epoch 3 are exact."""
    ref = build()
    ref.follow(plan)
    ref.set_epoch(2)
    want = [b.clone() for _ in range(2) for b in ref]  # epochs 2 and 3
    part = build()
    part.follow(plan)
    part.set_epoch(2)
    it = iter(part)
    for _ in range(k):
        next(it)
    state = part.state_dict()
    assert (state["epoch"], state["batch"], state["batch_size"], state["img_size"]) == (2, k, 5, 40)
    resumed = build()
    assert (resumed.img_size, resumed.batch_size) == plan(0)
    resumed.follow(plan)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mae_fast.data"):
        resumed.load_state_dict(state)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # nothing remapped
    got = [b.clone() for _ in range(2) for b in resumed]
    assert len(got) == len(want) - k
    for i, (a, b) in enumerate(zip(got, want[k:])):
        assert torch.equal(a, b), i
    close(ref, part, resumed)


@pytest.mark.parametrize("kind,workers", FOLDER_KINDS)
def test_resume_mid_epoch_of_the_second_phase_folder(kind, workers, caplog):
    assert_resumes_exactly(lambda: folder_loader(kind, workers), caplog)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_of_the_second_phase_shards(shards, workers, caplog):  # noqa: F811
    assert_resumes_exactly(lambda: shard_loader(shards, workers, streams=2), caplog)


def test_a_state_saved_at_the_phase_boundary_holds_the_next_epochs_shape(caplog):
    loader = folder_loader()
    loader.follow(plan)
    loader.set_epoch(1)
    list(loader)  # the last epoch of the first phase
    state = loader.state_dict()
    assert (state["epoch"], state["batch"], state["batch_size"], state["img_size"]) == (2, 0, 5, 40)
    resumed = folder_loader()
    resumed.follow(plan)
    with caplog.at_level(logging.WARNING, logger="mae_fast.data"):
        resumed.load_state_dict(state)
    assert not caplog.records and (resumed.epoch, resumed.batch, len(resumed)) == (2, 0, 4)


def test_resume_on_two_processes_with_the_same_global_batch(shards, caplog):  # noqa: F811
    """Saved by 1 process x 10 (plan doubled), resumed by 2 x 5 (the plan): folders map by samples seen,
    shards with fixed streams resume the same global order (rank r holds rows r, r + 2, ...)."""
    def doubled(epoch: int) -> tuple[int, int]:
        size, batch = plan(epoch)
        return size, 2 * batch

    one = make(seed=SEED)
    one.follow(doubled)
    one.set_epoch(2)
    next(iter(one))
    two = make(seed=SEED, rank=1, world_size=2, batch_size=3)
    two.follow(plan)
    two.load_state_dict(one.state_dict())
    assert (two.epoch, two.batch, two.batch_size) == (2, 1, 5)  # 10 samples seen: one batch of 2 x 5

    full = shard_loader(shards, streams=2)
    full.follow(doubled)
    full.set_epoch(2)
    want = [b.clone() for b in full]
    part = shard_loader(shards, streams=2)
    part.follow(doubled)
    part.set_epoch(2)
    next(iter(part))
    state = part.state_dict()
    rest = []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mae_fast.data"):
        for rank in range(2):
            loader = shard_loader(shards, rank=rank, world_size=2, streams=2)
            loader.follow(plan)
            loader.load_state_dict(state)
            rest.append([b.clone() for b in loader])
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert len(rest[0]) == len(want) - 1
    for w, a, b in zip(want[1:], *rest):
        assert torch.equal(w[0::2], a) and torch.equal(w[1::2], b)


# ------------------------------------------------------------------ without a plan, and errors
def test_without_follow_the_state_only_gains_the_image_size():
    loader = folder_loader()
    assert set(loader.state_dict()) == {"epoch", "batch", "seed", "batch_size", "world_size", "num_files", "kind",
                                        "img_size"}
    assert loader.state_dict()["img_size"] == 24
    loader.set_epoch(2)
    assert (loader.img_size, loader.batch_size) == plan(0)


def test_a_loader_without_an_image_size_cannot_follow():
    loader = LabelledLoader(scan_source("demo"), lambda img: img, batch_size=4)
    assert "img_size" not in loader.state_dict()
    with pytest.raises(ValueError, match="no image size"):
        loader.follow(plan)


def test_shard_dali_checks_a_planned_batch_against_its_streams(shards, monkeypatch):  # noqa: F811
    monkeypatch.setattr(dali_loader, "require_dali", lambda: None)  # construction needs no DALI
    loader = ShardDALILoader(scan_shards(str(shards)), 6, 24, streams=2, block=3)
    loader.follow(lambda epoch: (24, 6) if epoch < 2 else (40, 3))
    with pytest.raises(ShardError) as e:
        loader.set_epoch(2)
    assert str(e.value) == ("the DALI loader reads 2 streams per process (2 streams, 1 processes): the batch size "
                            "of epoch 2 (3) must be a multiple of 2")
    assert "\n" not in str(e.value)

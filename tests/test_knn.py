"""k-NN evaluation: the weighted vote against a plain reference, feature extraction in file order (one
process = two), the monitor on real classes (scikit-learn's digits: a briefly pretrained tiny MAE beats
its own starting weights), and a pretraining run with ``--knn-data`` training exactly as one without."""
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port

from digits import IMG_SIZE, SEEDS, labelled_subset
from mae_fast.train.engine.steps import StepPlan
from mae_fast.checkpoint import load_mae_checkpoint
from mae_fast.models_mae import create_model
from mae_fast.train.run_state import rng_state
from mae_fast.train.engine.distributed import DistInfo
from mae_fast.train.evaluation.knn import KnnMonitor, knn_accuracy, knn_scores

CPU = torch.device("cpu")


def reference_scores(train, labels, query, num_classes, k, t):
    """DINO's weighted k-NN written out: per query, sort all similarities, sum exp(s / t) per class."""
    train, query = F.normalize(train.double(), dim=1), F.normalize(query.double(), dim=1)
    out = torch.zeros(query.shape[0], num_classes, dtype=torch.float64)
    for q in range(query.shape[0]):
        sims = train @ query[q]
        for j in torch.argsort(sims, descending=True)[:k].tolist():
            out[q, labels[j]] += torch.exp(sims[j] / t)
    return out


@pytest.mark.parametrize("n_train,n_query,dim,classes,k", [(37, 11, 5, 3, 20), (7, 1, 3, 4, 20), (50, 9, 17, 10, 1)])
def test_knn_scores_match_reference(n_train, n_query, dim, classes, k):
    g = torch.Generator().manual_seed(n_train * 100 + k)
    train = torch.randn(n_train, dim, generator=g)
    labels = torch.randint(0, classes, (n_train,), generator=g)
    query = torch.randn(n_query, dim, generator=g)
    got = knn_scores(train, labels, query, classes, k=k, temperature=0.07)
    ref = reference_scores(train, labels, query, classes, min(k, n_train), 0.07)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    acc = knn_accuracy(train, labels, query, ref.argmax(1), classes, k=k)
    assert acc["knn_acc1"] == 100.0 and acc.get("knn_acc5", 100.0) == 100.0  # its own predictions as labels
    assert ("knn_acc5" in acc) == (classes > 5)  # top-5 of 5 classes or fewer is always 100%: left out


def mae_from(path) -> torch.nn.Module:
    model = create_model("mae_vit_tiny_patch8", img_size=IMG_SIZE)
    load_mae_checkpoint(model, str(path))
    return model


#: k-NN top-1 of the pretrained encoder minus that of its starting weights, in points, on every seed
KNN_MARGIN = 3.0


@pytest.mark.slow
def test_knn_of_pretrained_encoder_beats_its_initialization(digits_data, digits_runs):
    few = labelled_subset(digits_data, 20)  # 200 labelled neighbours to vote, 360 validation images
    monitor = KnnMonitor(str(few), IMG_SIZE, DistInfo(), CPU, batch_size=256)
    gaps = []
    for seed, (init, ckpt) in digits_runs.items():
        model = mae_from(ckpt)
        before_rng, before = rng_state(), {k: v.clone() for k, v in model.state_dict().items()}
        pre = monitor.run(model)["knn_acc1"]
        assert torch.equal(rng_state()["torch"], before_rng["torch"])  # no RNG drawn
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights untouched
        rand = monitor.run(mae_from(init))["knn_acc1"]
        gaps.append((seed, pre, rand))
    assert all(pre - rand >= KNN_MARGIN for _, pre, rand in gaps), gaps


# ------------------------------------------------------------------ one process = two
def _embed_worker(rank: int, world: int, port: int, data: str, ckpt: str, out: str) -> None:
    import torch.distributed as dist

    from mae_fast.train.evaluation.features import FeatureExtractor, mae_encoder
    from mae_fast.train.data.labelled import eval_transform, scan_labelled

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images = scan_labelled(data)
        model = mae_from(ckpt)
        feats, labels, index = FeatureExtractor(images, eval_transform(IMG_SIZE), 7, DistInfo(rank, world), CPU)(
            model, mae_encoder(model, "avg"))
        if rank == 0:
            torch.save({"feats": feats, "labels": labels, "index": index}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_embed_the_same_features_as_one(digits_data, digits_runs, tmp_path):
    from mae_fast.train.evaluation.features import FeatureExtractor, mae_encoder
    from mae_fast.train.data.labelled import eval_transform, scan_labelled

    ckpt = str(digits_runs[SEEDS[0]][1])
    images = scan_labelled(str(digits_data / "val"))
    model = mae_from(ckpt)
    one = FeatureExtractor(images, eval_transform(IMG_SIZE), 7, DistInfo(), CPU)(model, mae_encoder(model, "avg"))
    out = tmp_path / "two.pt"
    mp.spawn(_embed_worker, args=(2, free_port(), str(digits_data / "val"), ckpt, str(out)), nprocs=2)
    two = torch.load(out)
    assert torch.equal(two["index"], one[2]) and torch.equal(two["index"], torch.arange(len(images)))
    assert torch.equal(two["labels"], one[1])
    torch.testing.assert_close(two["feats"], one[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the monitor inside mae-pretrain
def _pretrain(tmp_path: Path, name: str, data: Path, *extra: str) -> dict:
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.pretrain import train

    args = ["--model", "mae_vit_tiny_patch8", "--img-size", str(IMG_SIZE), "--data", str(data / "val"),
            "--loader", "pil", "--num-workers", "0", "--batch-size", "32", "--epochs", "2", "--lr", "1e-3",
            "--warmup-epochs", "1", "--precision", "fp32", "--device", "cpu", "--no-progress", "--no-tensorboard",
            "--log-every", "5", "--save-every", "1000", "--compile", "off", "--output-dir", str(tmp_path / name)]
    return train(parse_config(args + list(extra)))


def _final(out: Path) -> dict:
    return torch.load(sorted((out / "checkpoints").glob("checkpoint-*.pth"))[-1], weights_only=False)


@pytest.fixture(scope="module")
def monitor_runs(digits_data, tmp_path_factory) -> Path:
    """Four short pretrainings on the digits' val/ (22 steps): "plain" without the monitor, "knn" with it
    every epoch, and "cut", the same as "knn" stopped at step 7 then resumed ("resumed": its summary).
    The k-NN run is the reference of both the monitor test and the resume test."""
    root = tmp_path_factory.mktemp("monitor")
    few = labelled_subset(digits_data, 10)  # 100 training images to search: what is held here is exactness
    knn = ["--knn-data", str(few), "--knn-every", "1"]
    runs = {"plain": _pretrain(root, "plain", digits_data), "knn": _pretrain(root, "knn", digits_data, *knn)}
    _pretrain(root, "cut", digits_data, *knn, "--max-steps", "7")
    runs["resumed"] = _pretrain(root, "cut", digits_data, *knn, "--resume", "auto")
    return root, runs


@pytest.mark.slow
def test_pretraining_with_the_monitor_trains_exactly_as_without(monitor_runs):
    root, runs = monitor_runs
    plain, watched = runs["plain"], runs["knn"]
    assert plain["knn"] is None and watched["knn"]["step"] == watched["steps"] == plain["steps"] == 22
    a, b = _final(root / "plain"), _final(root / "knn")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    rows = (root / "knn" / "eval.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,knn_acc1,knn_acc5" and [r.split(",")[0] for r in rows[1:]] == ["11", "22"]
    assert 0 <= watched["knn"]["knn_acc1"] <= 100


@pytest.mark.slow
def test_pretraining_with_the_monitor_resumes_exactly(monitor_runs):
    root, runs = monitor_runs
    resumed = runs["resumed"]
    assert resumed["steps_this_run"] == 15
    a, b = _final(root / "knn"), _final(root / "cut")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["knn"]["knn_acc1"] == pytest.approx(
        float((root / "knn" / "eval.csv").read_text().splitlines()[-1].split(",")[2]), abs=1e-4)
    assert resumed["knn"]["knn_acc1"] == pytest.approx(runs["knn"]["knn"]["knn_acc1"], abs=1e-4)


@pytest.mark.parametrize("metrics, text", [({"knn_acc1": 50.0}, "top-1 50.00%"),
                                           ({"knn_acc1": 50.0, "knn_acc5": 75.0}, "top-1 50.00%, top-5 75.00%")])
def test_monitor_logs_top5_only_when_measured(metrics, text, caplog):
    """With 5 classes or fewer the monitor's metrics have no knn_acc5, and its log line no top-5."""
    monitor = KnnMonitor.__new__(KnnMonitor)  # the logging alone: no data, no model
    monitor.info, monitor.every, monitor.k, monitor.temperature, monitor.pool = DistInfo(), 1, 20, 0.07, "cls"
    monitor.splits, monitor.last, monitor._last_step = {"train": [0] * 7, "val": [0] * 3}, None, -1
    monitor.run = lambda model: dict(metrics)
    with caplog.at_level(logging.INFO, logger="mae_fast.train"):
        assert monitor.maybe_run(None, 2, StepPlan.uniform_epochs(2, 3)) == {**metrics, "step": 2, "epoch": 1.0}
    lines = [m for m in (r.getMessage() for r in caplog.records) if m.startswith("k-NN")]
    assert len(lines) == 1 and lines[0].startswith(f"k-NN (k=20, T=0.07, cls pooling) at step 2 (epoch 1.00): {text} "
                                                   f"(7 train / 3 val images, "), lines

"""Sharded checkpoints (torch.distributed.checkpoint) on CPU: FSDP2 on two processes killed and resumed
bit-exact, each rank writing its own shard; consolidation to the full-format file (official keys,
loadable by mae-fast, timm-style classifiers and official-style code); a damaged newest checkpoint
falls back to the previous one; an interrupted save is never seen.

Run as a script under torchrun, this file is mae-pretrain writing sharded checkpoints (the worker of
the FSDP2 test)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_webdataset

from mae_fast.train.run_state import (RUN_STATE, ShardedCheckpoints, consolidate, is_sharded_checkpoint, read_sharded,
                                      remove_stale_temp)

ARGS = ["--model", "mae_vit_tiny_patch8", "--img-size", "32", "--loader", "pil", "--num-workers", "0",
        "--warmup-epochs", "1", "--lr", "1e-3", "--no-progress", "--no-tensorboard", "--log-every", "1",
        "--precision", "fp32", "--batch-size", "4", "--save-every", "1", "--keep-checkpoints", "2"]


def run_fsdp(args, out: Path, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(29000 + os.getpid() % 1000), "-m", "mae_fast.train.pretrain", *ARGS, "--distributed", "fsdp",
           "--checkpoint-format", "sharded", *args, "--output-dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def assert_same_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name])), (k, name)


@pytest.mark.slow
@needs_webdataset
def test_fsdp2_sharded_kill_and_resume_is_bit_exact(tmp_path):
    from mae_fast.train.make_shards import MakeShardsConfig, make_shards
    from mae_fast.train.data.sources import demo_dir

    data = tmp_path / "shards"
    make_shards(MakeShardsConfig(src=str(demo_dir()), dst=str(data), max_count=5, progress=False))
    args = ["--data", str(data), "--epochs", "2"]
    ref = run_fsdp(args, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert dirs(tmp_path / "ref") == ["checkpoint-00000003", "checkpoint-00000004"]  # newest 2 kept
    out = tmp_path / "killed"
    from mae_fast.train.engine.loop import FAULT_KILL_AT_STEP

    killed = run_fsdp(args, out, env={FAULT_KILL_AT_STEP: "3"})
    assert killed.returncode != 0
    assert dirs(out) == ["checkpoint-00000002", "checkpoint-00000003"]
    newest = out / "checkpoints" / "checkpoint-00000003"
    assert {p.name for p in newest.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", RUN_STATE}
    resumed = run_fsdp(args + ["--resume", "auto"], out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-00000003" in resumed.stderr
    a = read_sharded(tmp_path / "ref" / "checkpoints" / "checkpoint-00000004")
    b = read_sharded(out / "checkpoints" / "checkpoint-00000004")
    assert_same_state(a, b)
    assert a["step"] == b["step"] == 4 and a["loader"]["epoch"] == b["loader"]["epoch"]
    assert len(a["rng"]) == 2  # every rank's RNG states


def test_consolidated_equals_the_full_format_and_loads_everywhere(tmp_path):
    from mae_fast import mae_vit_tiny_patch8
    from mae_fast.checkpoint import encoder_state_dict, load_mae_checkpoint
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.pretrain import train

    cfg = lambda name: parse_config(ARGS + ["--data", "demo", "--epochs", "1", "--checkpoint-format", name,  # noqa: E731
                                            "--output-dir", str(tmp_path / name)])
    full = train(cfg("full"))
    sharded = train(cfg("sharded"))
    folder = Path(sharded["last_checkpoint"])
    assert is_sharded_checkpoint(folder) and folder.name == Path(full["last_checkpoint"]).stem
    out = consolidate(folder, tmp_path / "consolidated.pth")
    a = torch.load(full["last_checkpoint"], map_location="cpu", weights_only=False)
    b = torch.load(out, map_location="cpu", weights_only=False)
    assert_same_state(a, b)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key in ("step", "epoch", "loader", "step_runner", "world_size"):
        assert a[key] == b[key], key
    # official-style code: model.load_state_dict(checkpoint["model"]) on the MAE model
    model = mae_vit_tiny_patch8(img_size=32, norm_pix_loss=True)
    model.load_state_dict(b["model"])
    assert load_mae_checkpoint(mae_vit_tiny_patch8(img_size=32), str(out)).loaded
    # the encoder as a timm VisionTransformer (mae-finetune's classifier): only the head is new
    from mae_fast.train.evaluation.classifier import create_classifier

    vit = create_classifier("vit_tiny_patch8", 10, 32, "token", 0.0)
    missing, unexpected = vit.load_state_dict(encoder_state_dict(b), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    weights_only = consolidate(folder, tmp_path / "weights.pth", weights_only=True)
    assert set(torch.load(weights_only, weights_only=True)) == {"model"}


def test_damaged_newest_falls_back_and_interrupted_save_is_unseen(tmp_path, monkeypatch, caplog):
    from mae_fast import mae_vit_tiny_patch8
    from mae_fast.train.engine.optim import build_adamw

    torch.manual_seed(0)
    model = mae_vit_tiny_patch8(img_size=32)
    opt = build_adamw(model, 1e-3, 0.05)
    store = ShardedCheckpoints(tmp_path, keep=3)
    saved = {}
    for step in (1, 2):
        model(torch.randn(2, 3, 32, 32))[0].backward()
        opt.step()
        store.save(step, model, opt, {"step": step})
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    # a save killed half way leaves only its temp folder: not a checkpoint
    (tmp_path / ".checkpoint-00000003.sharded.tmp").mkdir()
    (tmp_path / ".checkpoint-00000003.sharded.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert [s for s, _ in store.list()] == [1, 2]
    shard = tmp_path / "checkpoint-00000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated
    fresh = mae_vit_tiny_patch8(img_size=32)
    fresh_opt = build_adamw(fresh, 1e-3, 0.05)
    with caplog.at_level(logging.WARNING, "mae_fast.train"):
        path, state = store.load_latest(fresh, fresh_opt)
    assert path.name == "checkpoint-00000001" and state == {"step": 1}
    assert any("checkpoint-00000002" in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[1][k]), k
    remove_stale_temp(tmp_path)  # the store's folder
    assert not (tmp_path / ".checkpoint-00000003.sharded.tmp").exists()
    with pytest.raises(ValueError, match="key 'pos_embed' has shape"):  # another model: refused by name
        from mae_fast.train.pretrain import check_resumable

        other = mae_vit_tiny_patch8(img_size=64)
        store.load(tmp_path / "checkpoint-00000001", other, build_adamw(other, 1e-3, 0.05),
                   check=lambda st, src: check_resumable(other, st, src))

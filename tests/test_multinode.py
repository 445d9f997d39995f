"""Several nodes on one machine: two torchrun launchers (--nnodes 2 --nproc-per-node 1, c10d rendezvous
on 127.0.0.1), each one process reading its own tar shards, train to the same weights as one process
with the same global batch and the same data streams (fp64, gloo on CPU). The nodes are started by
examples/multinode_torchrun.sh, the script the README gives for clusters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, needs_webdataset

from mae_fast.train.make_shards import MakeShardsConfig, make_shards
from mae_fast.train.data.sources import demo_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARGS = ["--model", "mae_vit_tiny_patch8", "--img-size", "32", "--loader", "pil", "--num-workers", "0",
        "--warmup-epochs", "1", "--lr", "1e-3", "--no-progress", "--no-tensorboard", "--log-every", "1",
        "--epochs", "2", "--save-every", "100", "--precision", "fp64"]


def final_weights(out: Path) -> dict:
    path = sorted((out / "checkpoints").glob("checkpoint-*.pth"))[-1]
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
@needs_webdataset
def test_two_torchrun_nodes_equal_one_process(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    make_shards(MakeShardsConfig(src=str(demo_dir()), dst=str(shards), max_count=5, progress=False))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the launch script of the README: torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d
    # --rdzv-endpoint 127.0.0.1:PORT -m mae_fast.train.pretrain ..., once per "node"
    env.update(NNODES="2", GPUS="1", HOST="127.0.0.1", PORT=str(port), RDZV_ID="mae-test",
               TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    launch = ["bash", str(EXAMPLES / "multinode_torchrun.sh"), "pretrain", *ARGS, "--data", str(shards),
              "--batch-size", "4", "--output-dir", str(tmp_path / "two")]
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]

    # the reference, meanwhile: one process, global batch 8, the two data streams the nodes read
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.pretrain import train

    train(parse_config(ARGS + ["--data", str(shards), "--batch-size", "8", "--data-streams", "2",
                               "--output-dir", str(tmp_path / "one")]))

    logs = [n.communicate(timeout=300)[0] for n in nodes]
    for n, text in zip(nodes, logs):
        assert n.returncode == 0, text[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert a["blocks.0.attn.qkv.weight"].dtype == torch.float64

"""A pretraining run killed mid-epoch and resumed saves the same RNG states (torch, numpy, python) as the
uninterrupted run: resuming the loader draws nothing from the global generators."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import free_port

from mae_fast.train.engine.config import parse_config
from mae_fast.train.engine.loop import FAULT_KILL_AT_STEP
from mae_fast.train.pretrain import train

ARGS = ["--model", "mae_vit_tiny_patch8", "--img-size", "32", "--data", "demo", "--loader", "pil",
        "--warmup-epochs", "1", "--lr", "1e-3", "--no-progress", "--no-tensorboard", "--log-every", "1",
        "--batch-size", "4", "--accum-iter", "2", "--epochs", "3", "--save-every", "1", "--precision", "fp32"]


def saved_rng(out: Path) -> dict:
    last = sorted((out / "checkpoints").glob("checkpoint-*.pth"))[-1]
    state = torch.load(last, map_location="cpu", weights_only=False)
    return {"step": state["step"], **state["rng"]}


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_kill_and_resume_saves_the_uninterrupted_rng_states(tmp_path, workers):
    args = ARGS + ["--num-workers", workers]
    train(parse_config(args + ["--output-dir", str(tmp_path / "ref")]))
    out = tmp_path / "killed"
    # 19 demo images, batch 4, drop_last: 4 batches = 2 steps per epoch; step 3 is mid-epoch 1
    killed = subprocess.run([sys.executable, "-m", "mae_fast.train.pretrain", *args, "--output-dir", str(out)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", FAULT_KILL_AT_STEP: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert saved_rng(out)["step"] == 3
    train(parse_config(args + ["--output-dir", str(out), "--resume", "auto"]))
    want, got = saved_rng(tmp_path / "ref"), saved_rng(out)
    assert got["step"] == want["step"] == 6
    assert torch.equal(got["torch"], want["torch"]), "global torch RNG state differs after resume"
    for key in ("keys", "pos", "has_gauss", "cached"):
        assert np.array_equal(np.asarray(got["numpy"][key]), np.asarray(want["numpy"][key])), f"numpy {key}"
    assert got["python"] == want["python"], "python random state differs after resume"


def test_resume_adopts_the_kernel_implementations_the_run_was_using(tmp_path, monkeypatch):
    """The checkpoint keeps the implementation each op timed its way to (on CUDA: fused or gemm patch
    embedding, whose rounding differs); a resumed run uses those, not a new timing's winners."""
    import mae_fast.kernels._utils as ku

    chosen = {"patch_embed_gather": {"N4 K16 D96 P192 p8 (32, 32) float32->float32 on cuda": "gemm"}}
    monkeypatch.setattr(ku, "_CHOICES", {op: dict(shapes) for op, shapes in chosen.items()})
    out = tmp_path / "run"
    train(parse_config(ARGS + ["--epochs", "1", "--output-dir", str(out)]))
    last = sorted((out / "checkpoints").glob("checkpoint-*.pth"))[-1]
    assert torch.load(last, map_location="cpu", weights_only=False)["kernel_choices"] == chosen
    monkeypatch.setattr(ku, "_CHOICES", {})  # a new process
    train(parse_config(ARGS + ["--epochs", "2", "--output-dir", str(out), "--resume", "auto"]))
    assert ku.backend_choices() == chosen


def _choices_worker(rank: int, port: int, out: str) -> None:
    """One rank of a two-process run (gloo): each rank starts with its own kernel choices, as each
    rank's first-step timing may give; it writes the choices it ends with and saw after step 1."""
    import mae_fast.kernels._utils as ku
    import mae_fast.train.engine.loop as loop
    import mae_fast.train.run_state as run_state

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    ku.restore_backend_choices({"patch_embed_gather": {"shape A": ["fused", "gemm"][rank], f"only rank {rank}": "gemm"},
                                "unshuffle": {"shape B": ["gemm", "fused"][rank]}})
    seen, agree = [], loop.agree_kernel_choices

    def recording_agree(info):
        agree(info)
        seen.append(ku.backend_choices())

    loop.agree_kernel_choices = run_state.agree_kernel_choices = recording_agree  # after step 1; at each save
    train(parse_config(ARGS + ["--num-workers", "0", "--epochs", "1", "--save-every", "1000",
                               "--output-dir", str(Path(out) / "run")]))
    torch.save({"seen": seen, "final": ku.backend_choices()}, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ranks_compute_with_rank0s_kernel_choices(tmp_path):
    """Under torchrun every rank times the Triton ops on its own; after the first step (and at each save)
    all adopt rank 0's choices, so ranks compute alike and a resumed run (rank 0's, from the checkpoint)
    continues exactly. A shape only another rank timed keeps that rank's choice."""
    import torch.multiprocessing as mp

    mp.spawn(_choices_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    rank0 = {"patch_embed_gather": {"shape A": "fused", "only rank 0": "gemm"}, "unshuffle": {"shape B": "gemm"}}
    assert r0["final"] == rank0 and r0["seen"][0] == rank0
    assert r1["seen"][0]["unshuffle"] == rank0["unshuffle"]  # after step 1, before step 2
    assert r1["final"]["patch_embed_gather"] == {**rank0["patch_embed_gather"], "only rank 1": "gemm"}
    assert len(r0["seen"]) == len(r1["seen"]) == 2  # after the first step, at the final save
    last = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*.pth"))[-1]
    assert torch.load(last, map_location="cpu", weights_only=False)["kernel_choices"] == rank0

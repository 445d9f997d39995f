"""mae-pretrain on CPU: demo learning, exact kill-and-resume, DDP/FSDP2 equivalence, bad checkpoints,
non-finite losses, the command line and mae-visualize."""
import argparse
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_fast.train.engine.config import PRESETS, PretrainConfig, build_parser, parse_config
from mae_fast.errors import NonFiniteLossError
from mae_fast.train.engine.loop import FAULT_KILL_AT_STEP, FAULT_NAN_AT_STEP
from mae_fast.train.pretrain import train
from mae_fast.train.visualize import main as visualize_main

SMALL = ["--model", "mae_vit_tiny_patch8", "--img-size", "32", "--data", "demo", "--loader", "pil",
         "--num-workers", "0", "--warmup-epochs", "1", "--lr", "1e-3", "--no-progress", "--no-tensorboard",
         "--log-every", "1"]


def small_cfg(tmp_path, **kw) -> PretrainConfig:
    cfg = parse_config(SMALL + ["--output-dir", str(tmp_path / kw.pop("name", "run"))])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def run_cli(args, env=None, nproc=1):
    base = [sys.executable, "-m", "mae_fast.train.pretrain"]
    if nproc > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000), "-m", "mae_fast.train.pretrain"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def final_ckpt(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("checkpoint-*.pth"))[-1]


@pytest.mark.slow
def test_demo_loss_goes_down(tmp_path):
    cfg = small_cfg(tmp_path, img_size=64, batch_size=8, epochs=15, lr=2e-3, save_every=100)
    summary = train(cfg)
    assert summary["steps"] == 30
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    losses = [float(r["loss"]) for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "config.json").exists()


def test_demo_with_a_bf16_residual_stream_draws_its_reconstruction(tmp_path):
    """The demo's figure is drawn as the model trained (under bf16 autocast): a bf16 residual stream between blocks
    met fp32 weights outside autocast ("mat1 and mat2 must have the same dtype") and the run failed at its end."""
    out = tmp_path / "demo"
    summary = train(parse_config(["--demo", "--img-size", "32", "--max-steps", "2", "--precision", "bf16",
                                  "--activation-dtype", "bf16", "--no-progress", "--no-tensorboard",
                                  "--output-dir", str(out)]))
    assert summary["figure"] == str(out / "reconstruction.png") and (out / "reconstruction.png").stat().st_size > 0


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path):
    args = SMALL + ["--batch-size", "4", "--accum-iter", "2", "--epochs", "4", "--save-every", "1",
                    "--keep-checkpoints", "2", "--precision", "fp32"]
    ref = run_cli(args + ["--output-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    killed = run_cli(args + ["--output-dir", str(out)], env={FAULT_KILL_AT_STEP: "5"})
    assert killed.returncode == -signal.SIGKILL
    assert final_ckpt(out).name == "checkpoint-00000005.pth"
    resumed = run_cli(args + ["--output-dir", str(out), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = weights(final_ckpt(tmp_path / "ref")), weights(final_ckpt(out))
    assert final_ckpt(out).name == final_ckpt(tmp_path / "ref").name
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(list((out / "checkpoints").glob("*.pth"))) == 2  # keeps the last k


TWO_PROCESS_ARGS = SMALL + ["--epochs", "2", "--save-every", "100", "--precision", "fp64"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The single-process reference (batch 8, fp64) both two-process modes are compared to, run once."""
    out = tmp_path_factory.mktemp("one-process") / "one"
    one = run_cli(TWO_PROCESS_ARGS + ["--batch-size", "8", "--output-dir", str(out)])
    assert one.returncode == 0, one.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, mode, one_process):
    args = TWO_PROCESS_ARGS
    two = run_cli(args + ["--batch-size", "4", "--distributed", mode, "--output-dir", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    a, b = weights(final_ckpt(one_process)), weights(final_ckpt(tmp_path / "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert a["blocks.0.attn.qkv.weight"].dtype == torch.float64


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, caplog):
    ref = train(small_cfg(tmp_path, name="ref", batch_size=4, epochs=2, save_every=1))
    cfg = small_cfg(tmp_path, name="run", batch_size=4, epochs=2, save_every=1, max_steps=6)
    train(cfg)
    out = tmp_path / "run" / "checkpoints"
    newest = final_ckpt(tmp_path / "run")
    assert newest.name == "checkpoint-00000006.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # truncated, as after a crash mid-copy
    cfg = small_cfg(tmp_path, name="run", batch_size=4, epochs=2, save_every=1, resume="auto")
    summary = train(cfg)
    assert any("checkpoint-00000006.pth" in r.getMessage() and "cannot be read" in r.getMessage()
               for r in caplog.records)
    assert summary["steps_this_run"] == summary["steps"] - 5  # resumed from step 5
    a, b = weights(ref["last_checkpoint"]), weights(summary["last_checkpoint"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(list(out.glob("*.pth"))) == 3


def test_nan_stops_with_step_and_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_NAN_AT_STEP, "3")
    cfg = small_cfg(tmp_path, batch_size=4, epochs=2, save_every=2)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*last good checkpoint: .*checkpoint-00000002.pth"):
        train(cfg)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("*.pth"))
    assert [p.name for p in ckpts] == ["checkpoint-00000002.pth"]
    assert all(torch.isfinite(v).all() for v in weights(ckpts[0]).values())


def test_skip_nonfinite(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(FAULT_NAN_AT_STEP, "3")
    cfg = small_cfg(tmp_path, batch_size=4, epochs=2, save_every=100, skip_nonfinite=1)
    summary = train(cfg)
    assert summary["skipped_nonfinite"] == 1 and summary["steps"] == 8
    assert any("step 3: non-finite loss, step skipped" in r.getMessage() for r in caplog.records)
    assert all(torch.isfinite(v).all() for v in weights(summary["last_checkpoint"]).values())


def test_help_lists_every_option():
    text = build_parser().format_help()
    for f in PretrainConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text, f
    for flag in ("--demo", "--preset", "--config", "--no-norm-pix-loss"):
        assert flag in text


def test_config_precedence_and_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("batch-size: 16\nblr: 0.001\nepochs: 5\n")
    cfg = parse_config(["--preset", "vit_h14_448", "--config", str(y), "--epochs", "7"])
    assert (cfg.model, cfg.img_size, cfg.grad_checkpointing, cfg.distributed) == ("mae_vit_huge_patch14", 448, 1, "fsdp")
    assert (cfg.batch_size, cfg.blr, cfg.epochs) == (16, 0.001, 7)
    y.write_text("batch_szie: 3\n")
    with pytest.raises(ValueError, match="unknown option 'batch_szie'"):
        parse_config(["--config", str(y)])
    assert parse_config(["--demo"]).model == PRESETS["demo"]["model"]
    defaults = parse_config([])
    assert (defaults.blr, defaults.weight_decay, defaults.mask_ratio, defaults.norm_pix_loss) == (1.5e-4, 0.05, 0.75, True)


def test_visualize_our_and_official_checkpoints(tmp_path):
    summary = train(small_cfg(tmp_path, batch_size=4, epochs=1, save_every=100))
    demo = sorted((Path(__import__("mae_fast").__file__).parent / "assets" / "demo").glob("*.jpg"))[0]
    out = tmp_path / "ours.png"
    assert visualize_main(["--checkpoint", summary["last_checkpoint"], "--image", str(demo), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    # official format: {"model": ..., "args": Namespace(model=..., norm_pix_loss=...)}
    official = tmp_path / "official.pth"
    torch.save({"model": weights(summary["last_checkpoint"]),
                "args": argparse.Namespace(model="mae_vit_tiny_patch8", input_size=32, norm_pix_loss=False)},
               official)
    out2 = tmp_path / "official.png"
    assert visualize_main(["--checkpoint", str(official), "--image", str(demo), "--out", str(out2)]) == 0
    assert out2.stat().st_size > 10_000
    enc_only = tmp_path / "enc.pth"
    torch.save({"model": {k: v for k, v in weights(official).items() if not k.startswith(("decoder", "mask"))}}, enc_only)
    assert visualize_main(["--checkpoint", str(enc_only), "--model", "mae_vit_tiny_patch8", "--image", str(demo),
                           "--out", str(tmp_path / "x.png")]) == 2


def test_no_host_sync_per_step(tmp_path, monkeypatch):
    """The hot loop reads no tensor value per step: syncs happen at log and save points only."""
    counts = {"n": 0}
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            counts["n"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    seen = []
    for steps in (3, 9):
        counts["n"] = 0
        cfg = small_cfg(tmp_path, name=f"s{steps}", loader="synthetic", batch_size=4, accum_iter=2, epochs=1,
                        max_steps=steps, log_every=100, save_every=100, precision="bf16")
        assert train(cfg)["steps"] == steps
        seen.append(counts["n"])
    assert seen[0] == seen[1] > 0, seen


def test_skipped_step_leaves_weights_and_optimizer_untouched():
    from mae_fast import mae_vit_tiny_patch8
    from mae_fast.train.engine.distributed import DistInfo
    from mae_fast.train.engine.loop import StepRunner
    from mae_fast.train.engine.optim import build_adamw

    torch.manual_seed(0)
    m = mae_vit_tiny_patch8(img_size=32)
    opt = build_adamw(m, 1e-3, 0.05)
    runner = StepRunner(m, opt, "bf16", torch.device("cpu"), DistInfo(), accum_iter=1, max_skips=1)
    imgs = torch.randn(2, 3, 32, 32)
    runner.backward(m(imgs)[0], 0, 2)
    runner.optimizer_step(0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = {k: v["exp_avg"].clone() for k, v in zip(range(10**6), opt.state.values())}
    runner.backward(m(imgs)[0] * float("nan"), 0, 2)
    runner.optimizer_step(1)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in zip(range(10**6), opt.state.values()):
        assert torch.equal(v["exp_avg"], state[k])
    assert runner.check(None) == 1
    runner.backward(m(imgs)[0] * float("inf"), 0, 2)
    runner.optimizer_step(2)
    with pytest.raises(NonFiniteLossError, match=r"step 2 \(2 non-finite step\(s\); at most 1 may be skipped\)"):
        runner.check("ckpt-1.pth")

"""A run never deletes or overwrites what another run wrote: run folders, resume appends, finished runs,
leftover temp files, strict JSON, plain log lines without a terminal, curves."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mae_fast.errors import ConfigError
from mae_fast.train.engine.config import parse_config
from mae_fast.train.engine.plots import main as plot_main
from mae_fast.train.pretrain import train
from mae_fast.train.run_state import choose_run_dir, holds_run

SMALL = ["--model", "mae_vit_tiny_patch8", "--img-size", "32", "--data", "demo", "--loader", "pil",
         "--num-workers", "0", "--warmup-epochs", "1", "--lr", "1e-3", "--no-progress", "--no-tensorboard",
         "--log-every", "1", "--batch-size", "8", "--save-every", "2", "--precision", "fp32"]


def run(args):
    return train(parse_config(SMALL + args))


def steps_logged(folder: Path):
    return [int(r["step"]) for r in csv.DictReader(open(folder / "log.csv"))]


def test_explicit_folder_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "run"
    run(["--epochs", "1", "--output-dir", str(out)])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=rf"--output-dir {out} already holds a run: continue it with --resume auto, "
                                          r"replace it with --overwrite, or choose another --output-dir"):
        run(["--epochs", "1", "--output-dir", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_default_folder_is_new_each_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run(["--epochs", "1"])
    second = run(["--epochs", "1"])
    assert (first["run_dir"], second["run_dir"]) == ("runs/mae", "runs/mae-2")
    assert holds_run(Path("runs/mae")) and holds_run(Path("runs/mae-2"))
    assert choose_run_dir("", "runs/mae", "auto", False) == Path("runs/mae-2")  # --resume auto: the newest
    assert choose_run_dir("", "runs/mae", "", False) == Path("runs/mae-3")


def test_resume_appends_and_finished_run_changes_nothing(tmp_path):
    out = tmp_path / "run"
    run(["--epochs", "2", "--max-steps", "2", "--output-dir", str(out)])
    stale = out / "checkpoints" / ".checkpoint-00000004.pth.k1ll3d.tmp"  # a save killed midway
    stale.write_bytes(b"partial")
    keep = out / "checkpoints" / "notes.tmp"  # not ours: kept
    keep.write_text("mine")
    resumed = run(["--epochs", "2", "--output-dir", str(out), "--resume", "auto"])
    assert resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    assert steps_logged(out) == [1, 2, 3, 4]
    assert not stale.exists() and keep.exists()
    summary = json.loads((out / "summary.json").read_text())  # strict JSON
    assert summary["steps"] == 4
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run(["--epochs", "2", "--output-dir", str(out), "--resume", "auto"])
    assert again["already_complete"] and again["steps_this_run"] == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_overwrite_replaces_the_old_run(tmp_path):
    out = tmp_path / "run"
    run(["--epochs", "2", "--output-dir", str(out)])
    run(["--epochs", "1", "--output-dir", str(out), "--overwrite"])
    assert steps_logged(out) == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-00000002.pth"]


def test_cli_finished_run_resume_and_other_size(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mae_fast.train.pretrain", *SMALL, "--epochs", "1", "--output-dir", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    assert "step 2/2" in first.stderr  # no terminal: one plain line per log point, no progress bar
    assert (out / "loss.png").stat().st_size > 0
    done = subprocess.run(cmd + ["--resume", "auto"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "already complete: step 2 of 2" in done.stderr, done.stderr
    other = subprocess.run([*cmd[:-2], "--img-size", "64", "--output-dir", str(tmp_path / "big"), "--resume",
                            str(out / "checkpoints" / "checkpoint-00000002.pth")],
                           capture_output=True, text=True, timeout=300, env=env)
    last = other.stderr.strip().splitlines()[-1]
    assert other.returncode != 0 and "Traceback" not in other.stderr, other.stderr
    assert last.startswith("mae-pretrain: error: ") and "checkpoint-00000002.pth" in last
    assert "pos_embed" in last and "(1, 17, 96)" in last and "(1, 65, 96)" in last, last


def test_mae_plot_redraws_curves(tmp_path, capsys):
    out = tmp_path / "run"
    run(["--epochs", "1", "--output-dir", str(out)])
    (out / "loss.png").unlink()
    assert plot_main([str(out)]) == 0
    assert (out / "loss.png").stat().st_size > 0
    assert plot_main([str(tmp_path / "nothing")]) == 2


def test_mae_plot_prints_each_file_or_one_line_error(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / "log.csv").write_text("step,loss,lr\n")  # a run that logged no step yet
    assert plot_main([str(run_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"mae-plot: error: {run_dir}: nothing to plot (log.csv has no logged steps yet, and no eval.csv with "
        f"accuracies)\n")
    (run_dir / "log.csv").write_text("step,loss,lr\n1,0.9,1e-4\n2,0.8,2e-4\n")
    (run_dir / "eval.csv").write_text("step,epoch,acc1,acc5\n2,0,10.0,50.0\n")
    assert plot_main([str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {run_dir / 'loss.png'}",
                                                    f"wrote {run_dir / 'accuracy.png'}"]


def test_out_of_memory_is_one_line_with_the_prediction(tmp_path, monkeypatch, capsys):
    import torch

    from mae_fast.train import pretrain

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pretrain, "fit", oom)
    assert pretrain.main(SMALL + ["--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mae-pretrain: error: out of memory"), err
    assert "predicted peak" in err[0] and "--batch-size auto" in err[0]

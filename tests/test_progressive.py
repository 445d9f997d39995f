"""Progressive-resolution pretraining (``mae-pretrain --grow-from``): every epoch at its size, batch and lr, the log
saying so, checkpoints that the official code, timm, mae-convert and mae-finetune read mid-schedule, exact resume at
a size change (killed at the new size's first step, and mid-save), the same result on two processes, and the
compiled model staying compiled, one static graph per size. The schedule's arithmetic and the model's position
tables at each size: tests/test_resolution.py."""
import csv
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_fast.models_mae import create_model
from mae_fast.train.engine.config import parse_config
from mae_fast.train.engine.loop import FAULT_KILL_AT_STEP
from mae_fast.train.pretrain import train

from conftest import free_port

# tiny model, final 32 px, from 16 px in steps of 8 px over 2 of 4 epochs: 16, 24, 32, 32 px; with --grow-batch
# tokens the batch is 4x at 16 px (4 patches against 16) and 1x at 24 px (9 patches); on the 19 demo photos
# (--batch-size 2) that is 2, 9, 9 and 9 steps
GROW = ["--model", "mae_vit_tiny_patch8", "--data", "demo", "--loader", "pil", "--num-workers", "0",
        "--img-size", "32", "--grow-from", "16", "--grow-epochs", "2", "--grow-step", "8", "--epochs", "4",
        "--batch-size", "2", "--warmup-epochs", "1", "--lr", "1e-3", "--no-progress", "--no-tensorboard",
        "--log-every", "1", "--save-every", "1", "--keep-checkpoints", "0"]
TOKENS = GROW + ["--grow-batch", "tokens"]
EPOCH_STEPS = [2, 9, 9, 9]


def run_cli(args, env=None, nproc=1, driver=None):
    base = [sys.executable, "-m", "mae_fast.train.pretrain"] if driver is None else [sys.executable, str(driver)]
    if nproc > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "mae_fast.train.pretrain"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def checkpoints(out: Path) -> list:
    return sorted((out / "checkpoints").glob("checkpoint-*.pth"))


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if atol:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)
        else:
            assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """One scheduled run (tokens batch, fp32), in process, with its log lines."""
    out = tmp_path_factory.mktemp("grown") / "run"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mae_fast.train")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        summary = train(parse_config(TOKENS + ["--precision", "fp32", "--output-dir", str(out)]))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, summary, [r.getMessage() for r in records]


def test_each_epoch_runs_at_its_size_batch_and_lr(grown):
    out, summary, lines = grown
    assert summary["steps"] == sum(EPOCH_STEPS) == 29
    assert summary["resolution"].startswith("16 -> 32 px in steps of 8 px over the first 2 of 4 epochs (3 sizes)")
    # the log names each phase's size, batch and lr before training, and each size as it starts
    assert "  epochs 0-0: 16 px, batch 8 per process (8 in all), base lr 0.004" in lines
    assert "  epochs 1-1: 24 px, batch 2 per process (2 in all), base lr 0.001" in lines
    assert "  epochs 2-3: 32 px, batch 2 per process (2 in all), base lr 0.001" in lines
    assert [m for m in lines if m.startswith("epoch ") and " px, batch " in m] == [
        "epoch 0: 16 px, batch 8 per process, lr x4", "epoch 1: 24 px, batch 2 per process, lr x1",
        "epoch 2: 32 px, batch 2 per process, lr x1"]
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 30))
    epochs = [float(r["epoch"]) for r in rows]
    # fractional, per epoch
    assert epochs[1] == 1.0 and epochs[2] == pytest.approx(1 + 1 / 9, abs=1e-4) and epochs[-1] == 4.0
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(4e-3 * 0.5)  # warmup over epoch 0, at 4x the lr
    assert lrs[2] == pytest.approx(1e-3)  # epoch 1.0: warmup done, the batch (and lr) back to 1x
    assert lrs[3] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (1 / 9) / 3)))  # the cosine, per step


def test_checkpoints_mid_schedule_hold_the_final_size_and_load_everywhere(grown, tmp_path, tree, capsys):
    """The checkpoint of step 2 (after the 16 px epoch) has the official keys and the final size's tables: the
    official model of the final size loads it strictly, and mae-convert (timm, Hugging Face) and mae-finetune read
    it."""
    from mae_fast.convert import main as convert
    from mae_fast.train import finetune

    out, _, _ = grown
    first = checkpoints(out)[1]
    assert first.name == "checkpoint-00000002.pth"
    state = torch.load(first, map_location="cpu", weights_only=False)
    assert state["loader"]["img_size"] == 16  # saved at the end of the 16 px epoch
    official = create_model("mae_vit_tiny_patch8", img_size=32)
    official.load_state_dict(state["model"], strict=True)
    assert torch.equal(state["model"]["pos_embed"], official.pos_embed.data)  # the final 32 px grid, 16 + 1 rows
    assert convert([str(first), str(tmp_path / "enc.safetensors")]) == 0
    assert convert([str(first), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_size"] == 32
    capsys.readouterr()
    assert finetune.main(["--model", "vit_tiny_patch8", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
                          "--precision", "fp32", "--device", "cpu", "--no-progress", "--no-tensorboard",
                          "--data", str(tree), "--finetune", str(first), "--max-steps", "1",
                          "--output-dir", str(tmp_path / "ft")]) == 0


@pytest.mark.slow
def test_killed_at_a_new_size_and_mid_save_resumes_bit_for_bit(tmp_path):
    args = GROW + ["--precision", "fp32", "--max-steps", "14"]  # 16 px (9 steps), then 24 px from step 9
    ref = run_cli(args + ["--output-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"  # at the first step of 24 px
    killed = run_cli(args + ["--output-dir", str(out)], env={FAULT_KILL_AT_STEP: "9"})
    assert killed.returncode == -signal.SIGKILL and checkpoints(out)[-1].name == "checkpoint-00000009.pth"
    resumed = run_cli(args + ["--output-dir", str(out), "--resume", "auto"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr
    assert "epoch 1: 24 px, batch 2 per process" in resumed.stderr
    assert_same_weights(checkpoints(tmp_path / "ref")[-1], checkpoints(out)[-1])

    # killed while writing the checkpoint of step 9, the last of 16 px: the half-written file is never read
    driver = tmp_path / "kill_in_save.py"
    driver.write_text(
        "import os, signal, sys, torch\n"
        "import mae_fast.checkpoint as c\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if isinstance(obj, dict) and obj.get('step') == 9:\n"
        "        f.write(b'partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "from mae_fast.train.pretrain import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "mid-save"
    killed = run_cli(args + ["--output-dir", str(out)], driver=driver)
    assert killed.returncode == -signal.SIGKILL and checkpoints(out)[-1].name == "checkpoint-00000008.pth"
    resumed = run_cli(args + ["--output-dir", str(out), "--resume", "auto"])
    assert resumed.returncode == 0 and "checkpoint-00000008.pth" in resumed.stderr, resumed.stderr
    assert_same_weights(checkpoints(tmp_path / "ref")[-1], checkpoints(out)[-1])


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_across_process_counts(tmp_path):
    """The same global batch schedule (2 x 1 per process against 1 x 2, tokens: x4 at 16 px) gives the same weights,
    also when a one-process run killed at the new size's first step is resumed on two processes."""
    args = TOKENS + ["--precision", "fp64", "--max-steps", "6"]
    one = run_cli(args + ["--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_cli([*args[:args.index("--batch-size")], "--batch-size", "1", *args[args.index("--batch-size") + 2:],
                   "--output-dir", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    assert_same_weights(checkpoints(tmp_path / "one")[-1], checkpoints(tmp_path / "two")[-1], atol=1e-9)

    out = tmp_path / "moved"
    killed = run_cli(args + ["--output-dir", str(out)], env={FAULT_KILL_AT_STEP: "2"})  # first step at 24 px
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli([*args[:args.index("--batch-size")], "--batch-size", "1", *args[args.index("--batch-size") + 2:],
                       "--output-dir", str(out), "--resume", "auto"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(checkpoints(tmp_path / "one")[-1], checkpoints(out)[-1], atol=1e-9)


def test_bad_schedules_are_one_line_errors(tmp_path):
    for extra, message in [
        (["--grow-from", "20"], "--grow-from 20 (--img-size 32): start size 20 px must be a multiple of the patch "
                                "size 8 between 8 and the final size 32"),
        (["--grow-from", "8", "--img-size", "256", "--grow-step", "8", "--grow-epochs", "40", "--epochs", "50"],
         "8 -> 256 px in steps of 8 px has 32 sizes, more than 16"),
        (["--grow-from", "16", "--grow-step", "12"], "size step 12 px must be a multiple of the patch size 8"),
    ]:
        result = run_cli(GROW[:GROW.index("--grow-from")] + GROW[GROW.index("--grow-from") + 2:] + extra
                         + ["--output-dir", str(tmp_path / "x")])
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_without_a_schedule_nothing_changes(tmp_path):
    """No --grow-from: no loader plan, no resolution log, the same steps per epoch as always."""
    cfg = parse_config(GROW[:GROW.index("--grow-from")] + ["--batch-size", "2", "--epochs", "1", "--precision", "fp32",
                                                           "--no-progress", "--output-dir", str(tmp_path / "fixed")])
    assert not cfg.schedule().grows
    summary = train(cfg)
    assert summary["steps"] == 9 and "resolution" not in summary


def test_the_compiled_model_stays_compiled_one_static_graph_per_size():
    """--compile blocks across the sizes of a schedule: each size compiles its own static graph per block shape
    (encoder, decoder), none is dynamic, none falls back to eager, and a size seen before compiles nothing again."""
    from mae_fast.compile import RECOMPILE_LIMIT, apply_compile
    from mae_fast.resolution import MAX_SIZES

    assert RECOMPILE_LIMIT >= 2 * 2 * MAX_SIZES  # encoder and decoder block, training and evaluation, per size
    graphs = []

    def record(gm, example_inputs):
        shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
        symbolic = [n for n in gm.graph.nodes if n.op == "placeholder"
                    and isinstance(n.meta.get("example_value"), torch.SymInt)]
        graphs.append((shapes, symbolic))
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch8", img_size=64)
    assert apply_compile(model, "blocks", torch.device("cpu"), backend=record) == "blocks"
    for size in (32, 48, 64, 32, 48):
        model.set_input_size(size)
        loss = model(torch.randn(2, 3, size, size))[0]
        loss.backward()
    assert len(graphs) == 3 * 2, [g[0] for g in graphs]  # 3 sizes x (encoder, decoder), the repeats reuse them
    assert not any(symbolic for _, symbolic in graphs)
    assert len({tuple(shapes) for shapes, _ in graphs}) == 6  # each graph for its own shapes
    torch._dynamo.reset()


def test_auto_batch_plans_every_size_of_the_schedule(caplog):
    """--batch-size auto plans the final size, then each other size at its batch (x4 at 16 px with tokens, where
    the cls tokens weigh more): one that does not fit lowers the batch to what fits there; each size is logged. A
    batch given on the command line that does not fit a size is a one-line error naming the size and batch."""
    from mae_fast.errors import MemoryPlanError
    from mae_fast.train.pretrain import memory_tracer, plan_memory

    flags = ["--model", "mae_vit_tiny_patch8", "--img-size", "32", "--grow-from", "16", "--grow-epochs", "2",
             "--grow-step", "8", "--epochs", "4", "--precision", "fp32", "--grow-batch", "tokens",
             "--memory-budget", "0.02"]
    cfg = parse_config(flags + ["--batch-size", "auto"])
    with caplog.at_level(logging.INFO, logger="mae_fast.train"):
        plan = plan_memory(cfg, torch.device("cpu"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory at ")]
    assert lines[0].startswith("memory at 16 px: the batch is lowered to ") and cfg.batch_size < plan.batch_size
    assert [m.split(":")[0] for m in lines[1:]] == ["memory at 16 px", "memory at 24 px"]
    limit = int(0.02 * 2**30 * 0.9)
    tracers = {size: memory_tracer(dataclasses.replace(cfg, img_size=size), torch.device("cpu"))
               for size in (16, 24, 32)}
    for size, multiple in ((16, 4), (24, 1), (32, 1)):  # every size fits at its batch
        assert tracers[size].predict(cfg.batch_size * multiple, 0).peak_bytes <= limit, size
    assert tracers[16].predict((cfg.batch_size + 1) * 4, 0).peak_bytes > limit  # the smallest size at its edge
    given = parse_config(flags + ["--batch-size", str(plan.batch_size), "--grad-checkpointing", "auto"])
    with pytest.raises(MemoryPlanError, match=rf"at 16 px the batch {4 * plan.batch_size} does not fit: "):
        plan_memory(given, torch.device("cpu"))


def test_the_vit_h14_448_preset_with_a_schedule_resolves_as_documented(capsys):
    """`mae-pretrain --preset vit_h14_448 --grow-from 224`: 224 -> 448 px in 28 px steps over 960 of 1600 epochs, the
    preset's other options kept, and --print-config writes the schedule's options back as YAML."""
    from mae_fast.train.engine.config import parse_config as parse

    cfg = parse(["--preset", "vit_h14_448", "--grow-from", "224"])
    schedule = cfg.schedule()
    assert (cfg.img_size, cfg.batch_size, cfg.grad_checkpointing, cfg.distributed) == (448, 32, 1, "fsdp")
    assert schedule.sizes() == list(range(224, 449, 28)) and schedule.grow_epochs == 960 and schedule.epochs == 1600
    with pytest.raises(SystemExit):
        parse(["--preset", "vit_h14_448", "--grow-from", "224", "--grow-batch", "tokens", "--print-config"])
    printed = capsys.readouterr().out
    assert "grow_from: 224\n" in printed and "grow_batch: tokens\n" in printed and "grow_epochs: null\n" in printed


def test_progressive_study_helpers():
    """The study's arms differ only by the schedule's options, and an epoch's time per size leaves out the first
    epoch (it starts the run) unless it is its size's only one."""
    from mae_fast.bench.progressive_study import arm_args, per_size_seconds

    assert arm_args("fixed", 10, 32) == []
    assert arm_args("grown", 10, 32, 0.3, "scaled") == ["--grow-from", "32", "--grow-epochs", "3", "--grow-positions",
                                                        "scaled"]
    rows = [{"img_size": 32, "seconds": 9.0}, {"img_size": 32, "seconds": 1.0}, {"img_size": 48, "seconds": 2.0},
            {"img_size": 64, "seconds": 3.0}, {"img_size": 64, "seconds": 5.0}]
    assert per_size_seconds(rows) == {32: 1.0, 48: 2.0, 64: 4.0}
    assert per_size_seconds([{"img_size": 32, "seconds": 9.0}, {"img_size": 64, "seconds": 3.0}]) == {32: 9.0, 64: 3.0}


def test_scaled_positions_run_and_are_used_below_the_final_size(tmp_path, caplog):
    """--grow-positions scaled: the smaller sizes use the scaled tables, the log says so, checkpoints are unchanged
    in keys and shapes."""
    from mae_fast.pos_embed import get_2d_sincos_pos_embed

    cfg = parse_config(TOKENS + ["--grow-positions", "scaled", "--max-steps", "3", "--precision", "fp32",
                                 "--output-dir", str(tmp_path / "scaled")])
    with caplog.at_level(logging.INFO, logger="mae_fast.train"):
        summary = train(cfg)
    assert summary["steps"] == 3
    assert any(r.getMessage().endswith("below 32 px, scaled position tables") for r in caplog.records)
    state = weights(checkpoints(tmp_path / "scaled")[-1])
    model = create_model("mae_vit_tiny_patch8", img_size=32)
    model.load_state_dict(state, strict=True)
    model.set_input_size(24, "scaled")
    want = torch.from_numpy(get_2d_sincos_pos_embed(96, 3, cls_token=True, span=4)).float()
    assert torch.equal(model.position_tables()[0][0], want)

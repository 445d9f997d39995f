"""The README's demo commands run as printed, in order: ``mae-pretrain --demo`` and every command of the README
that reads its outputs (every command of a fenced ``bash`` block that uses ``--demo`` or ``runs/demo``) runs
here, at a small size, in a temporary folder (the working directory, so ``runs/demo`` is the test's own), and
every file and checkpoint step the README names for the demo exists afterwards.

Small sizes: :data:`SMALL` maps each such README command to the options appended to it here (argparse takes
the last value of an option); a README demo command missing from it, or an entry the README no longer prints,
fails the test, so the README cannot print a demo command nobody runs. Checkpoint steps are those of the real
demo (its preset: steps, ``--save-every``, ``--keep-checkpoints``, computed with the training loop's own
``plan_steps``); the small run keeps fewer, earlier ones, and the i-th newest checkpoint the real demo keeps
stands for the small run's i-th newest in every command.
"""
import importlib.metadata
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: each README demo command (its words joined by spaces, comments dropped) -> options appended to it here.
#: None: run exactly as printed.
SMALL: Dict[str, Optional[List[str]]] = {
    # 2 epochs of the demo's 2 steps at 32 px, a checkpoint every step: 4 steps, checkpoints 2-4 kept (newest 3)
    "mae-pretrain --demo": ["--epochs", "2", "--img-size", "32", "--save-every", "1", "--log-every", "1",
                            "--device", "cpu", "--num-workers", "0", "--no-tensorboard"],
    # the demo on a resolution schedule, small: 16, 24 then 32 px over 4 epochs (4 steps)
    "mae-pretrain --demo --grow-from 32 --output-dir runs/demo-grow": [
        "--epochs", "4", "--img-size", "32", "--grow-from", "16", "--grow-epochs", "2", "--grow-step", "8",
        "--save-every", "2", "--device", "cpu", "--num-workers", "0", "--no-tensorboard"],
    # the digits as printed (1797 PNGs, 64 px)
    "python -c from mae_fast.bench.probe_study import write_digits; write_digits('digits')": None,
    # 16 px (2x2 patches: pos_embed resized), a fixed penalty (no search), 50 L-BFGS iterations at most
    "mae-linprobe --method logistic --finetune runs/demo/checkpoints/checkpoint-00003200.pth --model vit_tiny_patch8 "
    "--img-size 64 --data digits": ["--img-size", "16", "--device", "cpu", "--num-workers", "0", "--l2", "1e-3",
                                    "--max-iter", "50", "--no-tensorboard"],
}

#: names the README's demo section mentions that the commands above do not make, and why
NOT_MADE = {"runs/demo-2": "what a second `mae-pretrain --demo` would write; the test runs one"}

CHECKPOINT_STEP = re.compile(r"(?<![\d])(\d{8})(?=\.pth\b|/)")


def bash_blocks(text: str) -> List[List[str]]:
    """The commands of each fenced ``bash`` block, backslash continuations joined, blank lines dropped."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        commands, current = [], ""
        for line in body.splitlines():
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1].rstrip() + " "
                continue
            if current.strip() and not current.lstrip().startswith("#"):
                commands.append(current.strip())
            current = ""
        blocks.append(commands)
    return blocks


def words(command: str) -> List[str]:
    """The command's words as the shell splits them, its comment dropped."""
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # unbalanced quotes: a command no shell runs (a demo one then matches nothing in SMALL)
        return command.split()


def uses_demo(argv: List[str]) -> bool:
    return "--demo" in argv or any("runs/demo" in w for w in argv)


def demo_commands(text: str) -> List[List[str]]:
    """Every command of every bash block that holds a demo command (the demo itself, or one that reads
    runs/demo), in README order: the commands around them in a block prepare their inputs."""
    out = []
    for block in bash_blocks(text):
        argvs = [words(c) for c in block]
        if any(uses_demo(a) for a in argvs):
            out.extend(argvs)
    return out


def demo_section(text: str) -> str:
    m = re.search(r"^## First run.*?(?=^## )", text, re.M | re.S)
    assert m, "README: no '## First run' section"
    return m.group(0)


def kept_steps(argv: List[str]) -> List[int]:
    """The checkpoint steps a ``mae-pretrain`` run with ``argv`` keeps, oldest first: one every --save-every
    steps and at the last, the newest --keep-checkpoints of them (the loop's own step count)."""
    from mae_fast.train.data.sources import demo_dir
    from mae_fast.train.engine.config import parse_config
    from mae_fast.train.engine.steps import plan_steps

    cfg = parse_config(argv)
    assert cfg.data == "demo" and cfg.accum_iter == 1
    images = len(list(Path(demo_dir()).glob("*.jpg")))
    total = plan_steps(cfg, [(images // cfg.batch_size, cfg.batch_size)] * cfg.epochs).total_steps  # drop_last
    saved = sorted({s for s in range(cfg.save_every, total + 1, cfg.save_every)} | {total})
    return saved[-cfg.keep_checkpoints:] if cfg.keep_checkpoints else saved


def small_argv(argv: List[str], steps: Dict[int, int]) -> List[str]:
    """``argv`` with its small-size options appended and each real demo checkpoint step replaced by the
    small run's."""
    key = " ".join(argv)
    assert key in SMALL, f"README demo command without small-size options in tests/test_readme.py SMALL: {key}"

    def step(m: re.Match) -> str:
        real = int(m.group(1))
        assert real in steps, f"README: checkpoint step {real} in `{key}` is not one the demo keeps ({sorted(steps)})"
        return f"{steps[real]:08d}"

    return [CHECKPOINT_STEP.sub(step, w) for w in argv] + list(SMALL[key] or [])


def run(argv: List[str], cwd: Path, capsys) -> None:
    """One command in this process where it can be: a console script's ``main(argv)``, ``python -c``,
    ``python -m``; anything else as a subprocess. Fails with its output unless it exits 0."""
    prog, args = argv[0], argv[1:]
    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    if prog in scripts:
        rc = scripts[prog].load()(args)
    elif prog == "python" and args[:1] == ["-c"]:
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        rc = 0
    elif prog == "python" and args[:1] == ["-m"]:
        old = sys.argv
        sys.argv = [args[1], *args[2:]]
        try:
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            rc = 0
        except SystemExit as e:
            rc = e.code or 0
        finally:
            sys.argv = old
    else:
        p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
        print(p.stdout)
        print(p.stderr, file=sys.stderr)
        rc = p.returncode
    out = capsys.readouterr()
    assert rc == 0, f"`{shlex.join(argv)}` exited {rc}:\n{out.out[-3000:]}\n{out.err[-3000:]}"


def test_every_readme_demo_command_has_small_options():
    argvs = demo_commands(README.read_text(encoding="utf-8"))
    printed = [" ".join(a) for a in argvs]
    assert printed and printed[0] == "mae-pretrain --demo", printed
    assert [c for c in printed if c not in SMALL] == [], "README demo commands missing from SMALL"
    assert [c for c in SMALL if c not in printed] == [], "SMALL entries the README no longer prints"


def test_readme_checkpoint_steps_are_those_the_demo_keeps():
    text = README.read_text(encoding="utf-8")
    kept = kept_steps(["--demo"])
    named = {int(s) for s in CHECKPOINT_STEP.findall(demo_section(text))}
    named |= {int(s) for a in demo_commands(text) for w in a for s in CHECKPOINT_STEP.findall(w)}
    assert named and named <= set(kept), (sorted(named), kept)


def named_paths(section: str) -> List[Tuple[str, str]]:
    """(path under the working folder, as the README writes it) for each file or folder the demo section names:
    runs/... and digits/... paths, and bare log file names (in runs/demo)."""
    out = []
    for m in re.finditer(r"(?<![\w./-])((?:runs|digits)/[\w./-]*[\w/])", section):
        out.append((m.group(1), m.group(1)))
    for m in re.finditer(r"`([\w-]+\.(?:csv|json|png))`", section):
        out.append((f"runs/demo/{m.group(1)}", m.group(1)))
    for m in re.finditer(r"`(checkpoints/[\w./-]+)`", section):
        out.append((f"runs/demo/{m.group(1)}", m.group(1)))
    return out


@pytest.mark.slow
def test_readme_demo_commands_run_in_order(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    argvs = demo_commands(text)
    assert argvs[0] == ["mae-pretrain", "--demo"], argvs[0]
    real = kept_steps(["--demo"])
    small = kept_steps(["--demo", *SMALL["mae-pretrain --demo"]])
    assert len(small) == len(real), (real, small)
    steps = dict(zip(real, small))  # the i-th checkpoint the demo keeps -> the small run's i-th

    monkeypatch.chdir(tmp_path)
    for i, argv in enumerate(argvs):
        run(small_argv(argv, steps), tmp_path, capsys)
        if i == 0:  # the demo wrote exactly the checkpoints predicted for it (so the real demo's are right too)
            written = sorted(p.name for p in (tmp_path / "runs" / "demo" / "checkpoints").iterdir())
            assert written == [f"checkpoint-{s:08d}.pth" for s in small], written

    missing = []
    for path, as_written in named_paths(demo_section(text)):
        if path in NOT_MADE:
            continue
        for real_step, small_step in steps.items():
            path = path.replace(f"{real_step:08d}", f"{small_step:08d}")
        if not (tmp_path / path).exists():
            missing.append(f"{as_written} ({path})")
    for m in re.finditer(r"`-(\d{8})\.pth`", demo_section(text)):  # '`-00003000.pth`': another checkpoint
        path = f"runs/demo/checkpoints/checkpoint-{steps[int(m.group(1))]:08d}.pth"
        if not (tmp_path / path).exists():
            missing.append(f"{m.group(0)} ({path})")
    assert missing == [], f"named in the README's demo section, absent after its commands: {missing}"

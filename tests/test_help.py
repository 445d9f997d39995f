"""Every command's --help: each option has a description, shows its default at most once."""
import re
import runpy
import sys

import pytest

COMMANDS = ["mae_fast.train.pretrain", "mae_fast.train.finetune", "mae_fast.train.linprobe",
            "mae_fast.train.visualize", "mae_fast.train.engine.plots", "mae_fast.train.make_shards",
            "mae_fast.bench.throughput", "mae_fast.bench.profile", "mae_fast.bench.flops", "mae_fast.convert"]


def option_entries(text: str):
    """(option line, its help text) for each entry of argparse's option list."""
    lines = text.splitlines()
    entries = []
    for i, line in enumerate(lines):
        if not re.match(r"^  -", line):
            continue
        m = re.match(r"^  (-\S+(?: [^ ]+)*(?:, -\S+(?: [^ ]+)*)*)(?:\s{2,}(.*))?$", line)
        help_ = (m.group(2) or "") if m else ""
        j = i + 1
        while j < len(lines) and re.match(r"^\s{8,}\S", lines[j]) and not re.match(r"^  -", lines[j]):
            help_ += " " + lines[j].strip()
            j += 1
        entries.append((line.strip(), help_.strip()))
    return entries


def help_text(module: str, monkeypatch, capsys) -> str:
    """``python -m <module> --help`` as a user runs it, in this process (the commands are imported already)."""
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_has_help(module, monkeypatch, capsys):
    text = help_text(module, monkeypatch, capsys)
    entries = option_entries(text)
    assert entries, text
    for option, help_ in entries:
        if option.startswith("-h, --help"):
            continue
        assert help_, f"{module}: {option} has no help text"
        assert help_.count("(default") <= 1, f"{module}: {option}: {help_}"

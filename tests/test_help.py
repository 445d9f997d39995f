"""Every command's --help: each option has a description, shows its default at most once."""
import os
import re
import subprocess
import sys

import pytest

COMMANDS = ["mae_fast.train.pretrain", "mae_fast.train.finetune", "mae_fast.train.linprobe",
            "mae_fast.train.visualize", "mae_fast.train.engine.plots", "mae_fast.train.make_shards", "mae_fast.bench.throughput",
            "mae_fast.bench.profile", "mae_fast.bench.flops", "mae_fast.convert"]


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


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_has_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 0, r.stderr
    entries = option_entries(r.stdout)
    assert entries, r.stdout
    for option, help_ in entries:
        if option.startswith("-h, --help"):
            continue
        assert help_, f"{module}: {option} has no help text"
        assert help_.count("(default") <= 1, f"{module}: {option}: {help_}"

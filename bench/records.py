"""One way to record a GPU figure: a JSON file in bench/results/ with device, date, commit, command."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The checkout's HEAD commit, or "unknown" outside a git tree."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_name(device: Optional[torch.device] = None) -> str:
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def record_header(benchmark: str, device: Optional[torch.device] = None, command: Optional[str] = None) -> Dict[str, Any]:
    """The fields every record carries."""
    return {
        "benchmark": benchmark,
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_result(prefix: str, record: Any, folder: Path = RESULTS_DIR) -> Path:
    """Write ``record`` as ``<prefix>-<device>-<UTC time>.json`` under bench/results/; returns the path."""
    first = record[0] if isinstance(record, list) and record else record
    device = first.get("device", "unknown") if isinstance(first, dict) else "unknown"
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{prefix}-{slug}-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def junit_summary(xml_path: str) -> Dict[str, Any]:
    """Counts and failing test ids of a pytest ``--junitxml`` report."""
    import xml.etree.ElementTree as ET

    root = ET.parse(xml_path).getroot()
    cases = list(root.iter("testcase"))
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in cases
              if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    return {"tests": len(cases), "failed": len(failed), "skipped": skipped,
            "passed": len(cases) - len(failed) - skipped, "failures": failed}


def main(argv: Optional[list] = None) -> int:
    """``python -m mae_fast.bench.records PREFIX JUNIT_XML "COMMAND"``: record a GPU test run."""
    prefix, xml_path, command = (argv if argv is not None else sys.argv[1:])[:3]
    record = {**record_header(prefix, command=command), **junit_summary(xml_path)}
    print(f"wrote {write_result(prefix, record)}: {record['passed']} passed, {record['failed']} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

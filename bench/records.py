"""One way to record a benchmark figure: a JSON file with device, versions, clocks, date, commit, command.

GPU records go to ``bench/results/``; every record also goes to ``$MAE_RESULTS_DIR`` when it is set
(the GPU suite points it at a folder it hands back, the dry run at a temp folder). A record measured
on a CPU never lands in ``bench/results/``. Files are rewritten atomically, so a benchmark can write
its record after every measurement and a run cut off keeps what it measured. The benchmark commands'
``--help`` uses :class:`DefaultsHelpFormatter`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "MAE_RESULTS_DIR"


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" once: not when the help already says its default, nor for a default of None; the
    description and epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if "default" in help_ or action.default in (None, argparse.SUPPRESS) or not action.option_strings \
                or isinstance(action.default, bool):
            return help_
        return help_ + " (default: %(default)s)"


def git_commit() -> str:
    """The checkout's HEAD commit (with "+dirty" when tracked files changed), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=here, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
    except Exception:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def device_name(device: Optional[torch.device] = None) -> str:
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


NVSMI_FIELDS = {"driver_version": "driver", "clocks.sm": "sm_mhz", "clocks.max.sm": "max_sm_mhz",
                "clocks.mem": "mem_mhz", "clocks.max.mem": "max_mem_mhz", "power.draw": "power_w",
                "power.limit": "power_limit_w", "temperature.gpu": "temperature_c"}


def nvidia_smi(index: int = 0) -> Dict[str, Any]:
    """Driver, clocks (MHz), power (W) and temperature of GPU ``index`` from nvidia-smi; {} without it."""
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(index), f"--query-gpu={','.join(NVSMI_FIELDS)}",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip().splitlines()[0]
    except Exception:
        return {}
    info: Dict[str, Any] = {}
    for key, value in zip(NVSMI_FIELDS.values(), (v.strip() for v in out.split(","))):
        try:
            info[key] = value if key == "driver" else float(value)
        except ValueError:  # "[N/A]"
            info[key] = None
    return info


def _version(module: str) -> Optional[str]:
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception:
        return None


def environment(device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Versions (torch, triton, CUDA, cuDNN, xformers, driver) and, on a GPU, its name, SMs, memory and
    clocks now; never fails (a missing piece is None)."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    env: Dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "triton": _version("triton"),
        "xformers": _version("xformers"), "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smi = nvidia_smi(device.index or 0)
        env["driver"] = smi.pop("driver", None)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                      **smi}
    return env


def record_header(benchmark: str, device: Optional[torch.device] = None, command: Optional[str] = None) -> Dict[str, Any]:
    """The fields every record carries."""
    return {
        "benchmark": benchmark,
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        **environment(device),
    }


def utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _measured_on_gpu(record: Any) -> bool:
    first = record[0] if isinstance(record, list) and record else record
    device = first.get("device", "") if isinstance(first, dict) else ""
    return bool(device) and not device.startswith("cpu")


def result_folders(record: Any, folder: Optional[Path] = None) -> List[Path]:
    """Where ``record`` goes: ``folder`` if given, else bench/results/ (GPU records only) and
    $MAE_RESULTS_DIR (when set). CPU records are never put in bench/results/."""
    folders = [Path(folder)] if folder is not None else [RESULTS_DIR]
    if folder is None and os.environ.get(RESULTS_ENV):
        folders.append(Path(os.environ[RESULTS_ENV]))
    if not _measured_on_gpu(record):
        folders = [f for f in folders if f.resolve() != RESULTS_DIR.resolve()]
    return list(dict.fromkeys(folders))


def write_result(prefix: str, record: Any, folder: Optional[Path] = None, stamp: Optional[str] = None
                 ) -> Optional[Path]:
    """Write ``record`` as ``<prefix>-<device>-<stamp>.json`` into :func:`result_folders` (atomically;
    the same ``stamp`` rewrites the same file). Returns the first path written, or None if none."""
    first = record[0] if isinstance(record, list) and record else record
    device = first.get("device", "unknown") if isinstance(first, dict) else "unknown"
    slug = "".join(c if c.isalnum() else "-" for c in device).strip("-").lower()
    name = f"{prefix}-{slug}-{stamp or utc_stamp()}.json"
    text = json.dumps(record, indent=2) + "\n"
    written: List[Path] = []
    for target in result_folders(record, folder):
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, target / name)
        written.append(target / name)
    return written[0] if written else None


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
    """``python -m mae_fast.bench.records PREFIX JUNIT_XML "COMMAND"``: record a test run."""
    prefix, xml_path, command = (argv if argv is not None else sys.argv[1:])[:3]
    record = {**record_header(prefix, command=command), **junit_summary(xml_path)}
    path = write_result(prefix, record)
    print(f"{'wrote ' + str(path) if path else 'not recorded (CPU run, no $' + RESULTS_ENV + ')'}: "
          f"{record['passed']} passed, {record['failed']} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

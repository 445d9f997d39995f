"""The installed layout: one namespace, no generic top-level modules, console commands declared."""
import importlib.metadata as md
import json
import subprocess
import sys
import importlib.util
import pathlib

import mae_fast


def test_subpackages_live_under_mae_fast():
    for sub in ("kernels", "train", "bench"):
        spec = importlib.util.find_spec(f"mae_fast.{sub}")
        assert spec is not None, sub
        assert pathlib.Path(spec.origin).parent.name == sub


def test_no_generic_top_level_modules_installed(tmp_path):
    """Outside the source tree, `kernels`, `train` and `bench` must not import: we installed none."""
    code = ("import importlib.util, json; "
            "print(json.dumps([n for n in ('kernels', 'train', 'bench') if importlib.util.find_spec(n)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
    out = subprocess.run([sys.executable, "-c", "import mae_fast.kernels, mae_fast.train, mae_fast.bench"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_console_commands_declared():
    eps = {e.name: e.value for e in md.distribution("mae-fast").entry_points if e.group == "console_scripts"}
    assert eps["mae-flops"] == "mae_fast.bench.flops:main"
    assert mae_fast.__version__ == md.version("mae-fast")


def test_top_level_kernels_name_is_mae_fast_kernels_not_a_second_copy():
    """From the repository root (on sys.path under pytest), importing ``kernels`` (as transformers does
    when it probes for Hugging Face's ``kernels`` package) must not load the ops a second time."""
    import importlib
    import sys

    import mae_fast.kernels

    root = str(pathlib.Path(mae_fast.kernels.__file__).resolve().parents[1])
    sys.path.insert(0, root)
    try:
        assert importlib.import_module("kernels") is mae_fast.kernels
        assert not [name for name in sys.modules if name.startswith("kernels.")]
    finally:
        sys.path.remove(root)
        sys.modules.pop("kernels", None)

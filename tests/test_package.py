"""The installed layout: one namespace, no generic top-level modules, console commands declared."""
import importlib.metadata as md
import json
import subprocess
import sys
import importlib.util
import os
import pathlib

import pytest

import mae_fast

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_subpackages_live_under_mae_fast():
    for sub in ("kernels", "train", "bench"):
        spec = importlib.util.find_spec(f"mae_fast.{sub}")
        assert spec is not None, sub
        assert pathlib.Path(spec.origin).parent.name == sub


def test_no_generic_top_level_modules_installed(tmp_path):
    """Outside the source tree, `kernels`, `train` and `bench` are none of ours: we installed none (another
    distribution, e.g. Hugging Face's `kernels`, may own such a name)."""
    code = ("import importlib.util, json; "
            "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) "
            "for n in ('kernels', 'train', 'bench')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = {name: origin for name, origin in json.loads(out.stdout).items() if origin}
    assert not [origin for origin in found.values() if pathlib.Path(origin).resolve().is_relative_to(ROOT)], found
    out = subprocess.run([sys.executable, "-c", "import mae_fast.kernels, mae_fast.train, mae_fast.bench"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_console_commands_declared():
    eps = {e.name: e.value for e in md.distribution("mae-fast").entry_points if e.group == "console_scripts"}
    assert eps["mae-flops"] == "mae_fast.bench.flops:main"
    assert mae_fast.__version__ == md.version("mae-fast")


def run_in_root(code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root (so the root is on sys.path, as for any script run
    there), with ``extra_path`` appended to PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), extra_path) if p)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


#: in a child process: importing ``kernels`` loaded no second module object from our folder (whose import
#: would register the ``mae_fast::`` ops again and take their dispatch away from mae_fast.kernels)
NO_SECOND_COPY = """
import pathlib, sys
ours = pathlib.Path(mae_fast.kernels.__file__).parent
twice = [n for n, m in list(sys.modules.items()) if not n.startswith('mae_fast.') and m is not mae_fast.kernels
         and getattr(m, '__file__', None) and pathlib.Path(m.__file__).resolve().parent == ours]
assert not twice, twice
"""


def test_top_level_kernels_defers_to_another_distribution(tmp_path):
    """From the repository root, ``import kernels`` gives another installed ``kernels`` distribution (here a
    stand-in on PYTHONPATH, after the root), never our folder; mae_fast.kernels stays the only copy of ours."""
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("CUDAProperties = 'hub kernels'\n")
    (other / "layer.py").write_text("X = 1\n")
    out = run_in_root("import mae_fast.kernels, kernels, kernels.layer\n"
                      "assert kernels.CUDAProperties == 'hub kernels' and kernels.layer.X == 1, kernels.__file__\n"
                      + NO_SECOND_COPY, extra_path=str(tmp_path))
    assert out.returncode == 0, out.stderr


def test_top_level_kernels_is_mae_fast_kernels_when_no_other_is_installed():
    """With no other ``kernels`` on sys.path (any installed one is taken off the path in the child),
    ``import kernels`` from the root is mae_fast.kernels itself, not a second copy of the ops."""
    code = ("import importlib.machinery, os, sys, mae_fast.kernels\n"
            "root = os.path.realpath(os.getcwd())\n"
            "while True:\n"
            "    rest = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]\n"
            "    spec = importlib.machinery.PathFinder.find_spec('kernels', rest)\n"
            "    if spec is None: break\n"
            "    home = os.path.dirname(os.path.dirname(spec.origin))\n"
            "    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != os.path.realpath(home)]\n"
            "import kernels\n"
            "assert kernels is mae_fast.kernels, kernels\n" + NO_SECOND_COPY)
    out = run_in_root(code)
    assert out.returncode == 0, out.stderr


def test_transformers_imports_beside_mae_fast_kernels_from_the_repository_root():
    """transformers probes for Hugging Face's ``kernels`` (and imports it where installed): from the root it
    must get that package, not ours, and import together with mae_fast.kernels."""
    pytest.importorskip("transformers")
    out = run_in_root("from transformers import ViTMAEForPreTraining\nimport mae_fast.kernels\n" + NO_SECOND_COPY)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_second_editable_install_succeeds(tmp_path):
    """``pip install --no-deps --no-build-isolation -e .`` where mae-fast is already installed, from the root:
    setup.py runs with the root on sys.path while pip loads other distributions' entry points (Hugging Face's
    ``kernels`` registers one), so our ``kernels/`` folder must not shadow them. It installs into a new
    environment that sees this one's packages (mae-fast included) through a .pth file, so this environment,
    which other test processes import from meanwhile, is left as it is."""
    pytest.importorskip("setuptools", reason="--no-build-isolation builds with this environment's setuptools")
    import site
    import venv

    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    nested = next(env.glob("lib/python*/site-packages"), None) or env / "Lib" / "site-packages"
    (nested / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = str(next(p for p in (env / "bin" / "python", env / "Scripts" / "python.exe") if p.exists()))
    out = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input", "-q",
                          "-e", "."], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert any(nested.glob("*mae_fast*")), sorted(p.name for p in nested.iterdir())  # installed there
    code = "import importlib.metadata as md, mae_fast; print(md.version('mae-fast') == mae_fast.__version__)"
    check = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "True", check.stdout + check.stderr[-2000:]
    assert md.version("mae-fast") == mae_fast.__version__  # this environment's install untouched


def test_tar_shards_without_webdataset_fail_in_one_line(monkeypatch):
    """An image without webdataset (the lent GPU's) runs everything but shards; a shard source then names
    what is missing instead of a traceback from deep inside the loader."""
    from mae_fast.train.data.shards import list_shards
    from mae_fast.errors import ShardError

    monkeypatch.setitem(sys.modules, "braceexpand", None)  # import braceexpand -> ImportError
    with pytest.raises(ShardError, match=r"^tar shards need the webdataset package \(braceexpand is not "
                                         r"installed\): pip install webdataset$"):
        list_shards("train-{000000..000003}.tar")

"""Every torch name the package's code uses exists in the installed torch, CUDA-only paths included.

Most CUDA paths (CUDA graphs, events, streams, SDPA kernels, fused AdamW) never run on a CPU, so a name that
is newer than the GPU machine's torch (2.11), or one a later torch removed, would first fail there, in the
minutes the GPU is lent. This walks the source: ``torch.a.b`` chains (also through ``import torch.nn as nn``
style aliases) and ``from torch.x import y``, and resolves each one.
"""
import ast
import importlib
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [p for sub in ("mae_fast", "kernels", "train", "bench") for p in sorted((ROOT / sub).rglob("*.py"))]


def resolve(dotted: str) -> bool:
    """Whether ``torch.x.y...`` is an attribute or submodule chain of the installed torch."""
    parts = dotted.split(".")
    obj = torch
    for i, name in enumerate(parts[1:], 2):
        if hasattr(obj, name):
            obj = getattr(obj, name)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            return False
    return True


def torch_names(tree: ast.AST) -> set:
    """The dotted torch names a module uses: attribute chains on torch (or an alias of a torch module) and
    names imported from torch modules."""
    aliases = {"torch": "torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch" and not node.level:
            found.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                found.add(".".join([aliases[cur.id], *reversed(chain)]))
    return found


def test_the_walk_finds_names_and_catches_a_missing_one():
    tree = ast.parse("import torch\nimport torch.nn.functional as F\nfrom torch.nn.attention import sdpa_kernel\n"
                     "torch.cuda.graph; F.scaled_dot_product_attention; torch.cuda.not_there_yet")
    names = torch_names(tree)
    assert {"torch.cuda.graph", "torch.nn.functional.scaled_dot_product_attention",
            "torch.nn.attention.sdpa_kernel", "torch.cuda.not_there_yet"} <= names
    assert [n for n in sorted(names) if not resolve(n)] == ["torch.cuda.not_there_yet"]


def test_every_torch_name_used_exists_in_this_torch():
    missing = {}
    for path in SOURCES:
        names = torch_names(ast.parse(path.read_text(), str(path)))
        bad = sorted(n for n in names if not resolve(n))
        if bad:
            missing[str(path.relative_to(ROOT))] = bad
    assert len(SOURCES) > 50 and ROOT / "train" / "engine" / "loop.py" in SOURCES  # every shipped module, subfolders too
    assert not missing, f"names this torch {torch.__version__} lacks: {missing}"

"""Dependencies point down (docs/architecture.md): the shipped modules' imports, read from their source, form no
circle; mae_fast/ and kernels/ never import train/, bench/ or tests; no shipped module imports pytest; inside
train/ the layers are commands > evaluation > engine > data, run_state, and the longest import chain is short."""
import ast
import functools
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"mae_fast": "mae_fast", "kernels": "mae_fast.kernels", "train": "mae_fast.train", "bench": "mae_fast.bench"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Set[str]:
    """Every module ``path`` imports (at the top or inside a function), relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


@functools.lru_cache(maxsize=None)
def graph() -> Dict[str, Set[str]]:
    """Shipped module -> the shipped modules it imports."""
    paths = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    modules = {module_name(p): p for p in paths}
    return {m: {i for i in imported(p) if i in modules and i != m} for m, p in modules.items()}


def under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_covers_every_shipped_module():
    g = graph()
    assert len(g) > 50 and "mae_fast.train.engine.loop" in g and "mae_fast.train.run_state" in g
    assert "mae_fast.train.run_state" in g["mae_fast.train.engine.loop"]  # relative imports are resolved


def test_no_import_circles():
    g, state, circles = graph(), {}, []

    def visit(m: str, path: List[str]) -> None:
        state[m] = "open"
        for n in g[m]:
            if state.get(n) == "open":
                circles.append(" -> ".join(path[path.index(n):] + [m, n]))
            elif n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in g:
        if m not in state:
            visit(m, [])
    assert not circles, circles


@pytest.mark.parametrize("low, high", [
    (("mae_fast",), ("mae_fast.train", "mae_fast.bench")),  # the library never imports the commands
    (("mae_fast.kernels",), ("mae_fast.models_mae", "mae_fast.attention", "mae_fast.memory", "mae_fast.train")),
    (("mae_fast.train",), ("mae_fast.bench",)),
    (("mae_fast.train.run_state", "mae_fast.train.data"), ("mae_fast.train.engine", "mae_fast.train.evaluation")),
    (("mae_fast.train.engine",), ("mae_fast.train.evaluation", "mae_fast.train.pretrain", "mae_fast.train.finetune",
                                  "mae_fast.train.linprobe")),
])
def test_nothing_imports_upward(low, high):
    g = graph()
    wrong = [(m, n) for m in g if under(m, *low) and not under(m, *high) for n in g[m] if under(n, *high)]
    assert not wrong, wrong


def test_no_shipped_module_imports_pytest_or_the_tests():
    paths = [p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")]
    banned = ("pytest", "tests", "conftest")
    wrong = {str(p.relative_to(ROOT)): sorted(i for i in imported(p) if i.split(".")[0] in banned) for p in paths}
    assert not {k: v for k, v in wrong.items() if v}


def test_train_import_chains_are_short():
    """The longest chain of imports among train/'s modules (8 before train/ was grouped by job)."""
    g = {m: {n for n in ns if under(n, "mae_fast.train")} for m, ns in graph().items() if under(m, "mae_fast.train")}

    @functools.lru_cache(maxsize=None)
    def depth(m: str) -> int:
        return 1 + max((depth(n) for n in g[m]), default=0)

    longest = max(depth(m) for m in g)
    assert longest < 8, longest

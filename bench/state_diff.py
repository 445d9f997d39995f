"""Two training checkpoints compared tensor by tensor (weights and AdamW moments): the largest difference
relative to the first run's largest magnitude, with each attention's fused qkv bias split into its q, k and
v parts (the key bias is special: docs/semantics.md §10.13).

    python -m mae_fast.bench.state_diff A/checkpoints/checkpoint-00000006.pth B/checkpoints/checkpoint-00000006.pth
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch

#: AdamW's per-parameter moments compared beside the weights
MOMENTS = ("exp_avg", "exp_avg_sq")


class Difference(NamedTuple):
    name: str  # weight name, "name[q|k|v]" for a qkv bias part, "exp_avg name" / "exp_avg_sq name" for moments
    relative: float  # max |a - b| / max |a| (max |a - b| where a is all zero)
    largest: float  # max |a|


def key_bias(name: str) -> bool:
    """Whether ``name`` (a weight or its moment) is the key part of an attention's qkv bias (zero gradient in exact arithmetic)."""
    return name.endswith("qkv.bias[k]")


def _parts(name: str, t: torch.Tensor) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, t)``, or a qkv bias as its q, k and v thirds."""
    if name.endswith("qkv.bias"):
        for part, chunk in zip("qkv", t.chunk(3)):
            yield f"{name}[{part}]", chunk
    else:
        yield name, t


def _difference(name: str, a: torch.Tensor, b: torch.Tensor) -> Difference:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    gap, largest = float((a - b).abs().max()), float(a.abs().max())
    return Difference(name, gap / largest if largest else gap, largest)


def tensors_of(state: Mapping) -> Dict[str, torch.Tensor]:
    """Floating-point weights (``state["model"]``) and AdamW moments (``state["optimizer"]``, keyed by
    parameter name as mae-fast checkpoints store them) of a checkpoint, qkv biases split."""
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise ValueError("not a training checkpoint: it has no 'model' state_dict")
    out: Dict[str, torch.Tensor] = {}
    for name, t in state["model"].items():
        if torch.is_tensor(t) and t.is_floating_point():
            out.update(_parts(name, t))
    for name, moments in state.get("optimizer", {}).get("state", {}).items():
        for moment in MOMENTS:
            if moment in moments:
                out.update((f"{moment} {part}", t) for part, t in _parts(str(name), moments[moment]))
    return out


def state_differences(a: Mapping, b: Mapping) -> List[Difference]:
    """Per-tensor differences of two checkpoints of one model, largest first; ValueError when their tensors
    or shapes do not match."""
    ta, tb = tensors_of(a), tensors_of(b)
    if ta.keys() != tb.keys():
        raise ValueError(f"the checkpoints hold different tensors: only in the first {sorted(ta.keys() - tb.keys())[:5]}, "
                         f"only in the second {sorted(tb.keys() - ta.keys())[:5]}")
    for name in ta:
        if ta[name].shape != tb[name].shape:
            raise ValueError(f"{name}: shape {tuple(ta[name].shape)} in the first, {tuple(tb[name].shape)} in the second")
    return sorted((_difference(n, ta[n], tb[n]) for n in ta), key=lambda d: -d.relative)


def format_table(rows: List[Difference], top: Optional[int] = None) -> str:
    """A plain table of ``rows`` (the first ``top``), key-bias rows marked."""
    lines = [f"{'relative':>10}  {'max |a|':>10}  tensor"]
    for d in rows[:top]:
        mark = "  (key bias: gradient zero in exact arithmetic)" if key_bias(d.name) else ""
        lines.append(f"{d.relative:10.3e}  {d.largest:10.3e}  {d.name}{mark}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mae_fast.bench.state_diff", description=__doc__.split("\n\n")[0])
    p.add_argument("first", help="checkpoint .pth of the first run")
    p.add_argument("second", help="checkpoint .pth of the second run")
    p.add_argument("--top", type=int, default=30, help="rows shown, largest difference first (default: 30)")
    args = p.parse_args(argv)
    try:
        a, b = (torch.load(path, map_location="cpu", weights_only=False) for path in (args.first, args.second))
        rows = state_differences(a, b)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"state_diff: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

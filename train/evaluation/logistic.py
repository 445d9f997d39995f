"""Multinomial logistic regression on frozen features, fitted to convergence: the feature probe of
``mae-linprobe --method logistic``.

Features are standardized with the training mean and variance (exactly the linear probe's
``BatchNorm1d(affine=False, eps=1e-6)`` in eval mode, so the result is a linear-probe head). The
objective ``mean cross-entropy + l2 / 2 * |W|^2`` is convex and minimized full-batch with
``torch.optim.LBFGS`` (strong-Wolfe line search) from zero weights, on the device; features that do
not fit there are streamed in chunks (the gradient is still the exact full-batch one). The L2 penalty
is chosen on a held-out part of the training images (stratified by class, seeded), never on the
evaluation set, along a path from strong to weak penalties (each fit warm-started from the previous;
the path stops once three penalties in a row score no better), then the probe is refitted on all training
images. A fit counts as converged only when its largest gradient entry is within the tolerance.
Everything is deterministic for a seed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger("mae_fast.train")

BN_EPS = 1e-6  # the linear probe's BatchNorm1d eps
#: the L2 penalties tried (half-decades from 1 down to 1e-5), strongest first
L2_GRID: Tuple[float, ...] = tuple(10.0 ** (-k / 2) for k in range(11))
CHUNK_ROWS = 65536  # rows moved to the device (and cast to float64) at a time
PATIENCE = 3  # the search stops after this many penalties in a row without a better held-out score


def row_chunks(x: torch.Tensor, rows: int = CHUNK_ROWS) -> List[torch.Tensor]:
    """``x`` in views of ``rows`` rows (one empty view for an empty ``x``)."""
    return list(x.split(rows))


@dataclass
class Standardizer:
    """x -> (x - mean) / sqrt(var + 1e-6), with the (biased) variance of the training features."""

    mean: torch.Tensor
    var: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> "Standardizer":
        """Mean and variance in float64, two passes over ``chunk_rows`` rows at a time (no float64 copy of x)."""
        n = x.shape[0]
        mean = sum(c.double().sum(dim=0) for c in row_chunks(x, chunk_rows)) / n
        squares = sum(((c.double() - mean) ** 2).sum(dim=0) for c in row_chunks(x, chunk_rows))
        return cls(mean.float(), (squares / n).float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / torch.sqrt(self.var.to(x.device) + BN_EPS)


@dataclass
class LogisticModel:
    """A fitted probe: logits = standardize(x) @ weight.T + bias."""

    standardizer: Standardizer
    weight: torch.Tensor
    bias: torch.Tensor
    l2: float
    iterations: int
    converged: bool
    search: List[Dict[str, float]] = field(default_factory=list)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return linear_logits(self.standardizer(x), self.weight, self.bias)


def linear_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias in the weights' dtype (float64) on their device, ``CHUNK_ROWS`` rows of x at a time;
    returned as float32."""
    return torch.cat([(c.to(weight.device, weight.dtype) @ weight.T + bias).float() for c in row_chunks(x)])


def _chunks(x: torch.Tensor, y: torch.Tensor, device: torch.device, dtype: torch.dtype, rows: int):
    for xc, yc in zip(row_chunks(x, rows), row_chunks(y, rows)):
        yield xc.to(device, dtype, non_blocking=True), yc.to(device)


def fit_multinomial(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, device: torch.device,
                    init: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, max_iter: int = 5000,
                    chunk_rows: int = CHUNK_ROWS, dtype: torch.dtype = torch.float64
                    ) -> Tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Minimize mean CE(x @ W.T + b, y) + l2 / 2 * |W|^2 with full-batch L-BFGS (``x`` standardized, on the
    device or streamed to it in ``chunk_rows`` rows). Returns (W, b, iterations, converged)."""
    n, dim = x.shape
    weight = torch.zeros(num_classes, dim, device=device, dtype=dtype) if init is None else init[0].to(device, dtype)
    bias = torch.zeros(num_classes, device=device, dtype=dtype) if init is None else init[1].to(device, dtype)
    weight, bias = weight.clone(), bias.clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    # |w - w*| <= |grad| / l2 (the objective is l2-strongly convex): the gradient tolerance scales with l2
    tol_grad = min(1e-5, 1e-3 * l2) if l2 > 0 else 1e-5
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2,
                            history_size=20, tolerance_grad=tol_grad, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        total = torch.zeros((), device=device, dtype=dtype)
        for xc, yc in _chunks(x, y, device, dtype, chunk_rows):
            loss = F.cross_entropy(xc @ weight.T + bias, yc, reduction="sum") / n
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * l2 * (weight * weight).sum()
        penalty.backward()
        return total + penalty.detach()

    with torch.enable_grad():
        opt.step(closure)
    iterations = int(opt.state[weight].get("n_iter", 0))
    with torch.enable_grad():
        closure()
    grad_max = max(weight.grad.abs().max().item(), bias.grad.abs().max().item())
    converged = grad_max <= tol_grad  # L-BFGS also stops at max_eval or on a stalled step: not convergence
    return weight.detach(), bias.detach(), iterations, converged


def features_home(nbytes: int, device: torch.device, free_bytes: Optional[int] = None) -> torch.device:
    """Where training features of ``nbytes`` stay during the fit: on the GPU while they and their standardized
    and held-out copies (about 3x) take at most half its free memory, else in host memory, streamed to the GPU
    in chunks by :func:`fit_multinomial` (the same full-batch gradient)."""
    if device.type != "cuda":
        return device
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return device if 3 * nbytes <= free_bytes // 2 else torch.device("cpu")


@torch.no_grad()
def scores_of(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """Top-1 / top-5 (%) and mean cross-entropy of ``logits`` (no top-5 with 5 classes or fewer)."""
    from .classifier import topk_hits, without_trivial_top5

    hits1, hits5 = topk_hits(logits, labels)
    n = max(1, labels.shape[0])
    return without_trivial_top5({"acc1": 100.0 * hits1.item() / n, "acc5": 100.0 * hits5.item() / n,
                                 "loss": F.cross_entropy(logits, labels).item()}, logits.shape[1])


def holdout_split(labels: torch.Tensor, groups: torch.Tensor, fraction: float, seed: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (fit, held out) over rows: ``fraction`` of each class's images (``groups``: the image
    of each row, so every view of an image falls on the same side), drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels_cpu, groups_cpu = labels.cpu(), groups.cpu()
    images, first = torch.unique(groups_cpu, return_inverse=True)
    image_label = torch.empty(len(images), dtype=torch.long)
    image_label[first] = labels_cpu
    held = torch.zeros(len(images), dtype=torch.bool)
    for c in torch.unique(image_label).tolist():
        members = torch.nonzero(image_label == c).flatten()
        n_held = int(round(fraction * len(members)))
        if len(members) > 1:
            n_held = min(max(n_held, 1), len(members) - 1)
        else:
            n_held = 0
        held[members[torch.randperm(len(members), generator=g)[:n_held]]] = True
    row_held = held[first].to(labels.device)
    return ~row_held, row_held


def fit_probe(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, num_classes: int, device: torch.device, *,
              l2: Optional[float] = None, grid: Sequence[float] = L2_GRID, holdout: float = 0.2, seed: int = 0,
              max_iter: int = 5000, patience: int = PATIENCE) -> LogisticModel:
    """The probe on training features ``x`` (labels ``y``, image of each row ``groups``): L2 penalty ``l2``,
    or the one of ``grid`` with the best held-out top-1 (ties: lower held-out loss), the path from strong to weak
    stopped once ``patience`` penalties in a row have not beaten the best; then refit on all rows."""
    search: List[Dict[str, float]] = []
    if l2 is None:
        fit_rows, held_rows = holdout_split(y, groups, holdout, seed)
        std = Standardizer.fit(x[fit_rows])
        xf, yf, xh, yh = std(x[fit_rows]), y[fit_rows], std(x[held_rows]), y[held_rows]
        init = None
        best: Optional[Tuple[float, float, float]] = None
        worse = 0
        for value in sorted(grid, reverse=True):
            w, b, its, ok = fit_multinomial(xf, yf, num_classes, value, device, init, max_iter)
            init = (w, b)
            held = scores_of(linear_logits(xh, w, b), yh.to(device))
            search.append({"l2": value, "holdout_acc1": held["acc1"], "holdout_loss": held["loss"],
                           "iterations": its})
            log.info("feature probe: l2 %.3g: held-out top-1 %.2f%%, loss %.4f (%d L-BFGS iterations%s)", value,
                     held["acc1"], held["loss"], its, "" if ok else ", NOT converged")
            key = (held["acc1"], -held["loss"], value)
            if best is None or key > best:
                best, worse = key, 0
            else:
                worse += 1
                if worse >= patience:  # held-out scores only fall past here; weaker penalties fit slowest
                    break
        assert best is not None
        l2 = best[2]
        if len(grid) > 1 and (l2 == max(grid) or (l2 == min(grid) and len(search) == len(grid))):
            log.info("feature probe: l2 %.3g is at the end of the grid searched (%.3g .. %.3g); pass --l2 to try "
                     "beyond it", l2, min(grid), max(grid))
    std = Standardizer.fit(x)
    w, b, its, ok = fit_multinomial(std(x), y, num_classes, l2, device, None, max_iter)
    if not ok:
        log.warning("feature probe: L-BFGS did not converge in %d iterations at l2 %.3g (raise --max-iter)",
                    max_iter, l2)
    return LogisticModel(std, w, b, float(l2), its, ok, search)


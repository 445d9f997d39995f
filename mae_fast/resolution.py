"""Progressive resolution: the image size (and batch) of each pretraining epoch, and what a schedule costs.

A schedule grows the image side linearly from ``start`` to ``final`` px over the first ``grow_epochs`` epochs,
then keeps ``final`` to the end. Sizes between the two are rounded to multiples of ``step`` px (two patches
unless set), which bounds the number of sizes, hence of compiled graphs; every size is a multiple of the patch
size (MAE's sin-cos position tables are functions of the patch grid, so the same weights train at each). The
size changes only at epoch boundaries.

``grow_batch="tokens"`` keeps the tokens per batch roughly constant: at a size with ``L`` patches the batch is
``floor(L_final / L)`` times the final size's (an integer multiple, so the same global batch schedule runs on any
number of processes) and the lr follows it (the linear rule); ``"fixed"`` keeps the batch and lr.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .flops import count_flops

#: how the batch follows the size: "fixed" (the same batch at every size) or "tokens" (see the module doc)
GROW_BATCH = ("fixed", "tokens")
#: the most sizes a schedule may have: each is one compiled graph per block shape (mae_fast.compile)
MAX_SIZES = 16


def batch_multiple(size: int, final: int, patch: int) -> int:
    """How many times the final size's batch a batch at ``size`` holds to keep its tokens per batch at most the
    final size's and within 2x of it: ``floor(L_final / L_size)`` (1 at the final size)."""
    return max(1, (final // patch) ** 2 // (size // patch) ** 2)


@dataclass(frozen=True)
class ResolutionSchedule:
    """Image side per epoch: ``start`` px at epoch 0, growing linearly to ``final`` by epoch ``grow_epochs``
    (sizes in between rounded to the nearest multiple of ``step`` px, 0: two patches), then ``final`` until
    ``epochs``; ``grow_batch`` says how the batch follows (see the module doc)."""

    start: int
    final: int
    grow_epochs: int
    epochs: int
    patch: int
    step: int = 0
    grow_batch: str = "fixed"

    def __post_init__(self) -> None:
        if self.patch < 1 or self.final % self.patch:
            raise ValueError(f"final size {self.final} px must be a multiple of the patch size {self.patch}")
        if not self.patch <= self.start <= self.final or self.start % self.patch:
            raise ValueError(f"start size {self.start} px must be a multiple of the patch size {self.patch} between "
                             f"{self.patch} and the final size {self.final}")
        if not 0 <= self.grow_epochs <= self.epochs or self.epochs < 1:
            raise ValueError(f"grow epochs {self.grow_epochs} must be between 0 and the epochs ({self.epochs}, >= 1)")
        if self.step < 0 or self.step % self.patch:
            raise ValueError(f"size step {self.step} px must be a multiple of the patch size {self.patch} "
                             f"(0: two patches)")
        if self.grow_batch not in GROW_BATCH:
            raise ValueError(f"grow batch {self.grow_batch!r} is not one of {', '.join(GROW_BATCH)}")

    @property
    def size_step(self) -> int:
        """The rounding of the sizes in between, in px."""
        return self.step or 2 * self.patch

    @property
    def grows(self) -> bool:
        """Whether any epoch runs below the final size."""
        return self.start < self.final and self.grow_epochs > 0

    def size_at(self, epoch: int) -> int:
        """The image side of epoch ``epoch`` (0-based)."""
        if epoch >= self.grow_epochs:
            return self.final
        if epoch <= 0:
            return self.start
        side = self.start + (self.final - self.start) * epoch / self.grow_epochs
        step = self.size_step
        return min(self.final, max(self.start, step * round(side / step)))

    def batch_at(self, epoch: int, batch: int) -> int:
        """The batch of epoch ``epoch`` when the final size's is ``batch``."""
        if self.grow_batch == "fixed":
            return batch
        return batch * batch_multiple(self.size_at(epoch), self.final, self.patch)

    def sizes(self) -> List[int]:
        """The distinct sizes, in order."""
        return [size for _, _, size in self.phases()]

    def phases(self) -> List[Tuple[int, int, int]]:
        """(first epoch, end epoch (exclusive), size) of each run of epochs at one size, in order."""
        out: List[Tuple[int, int, int]] = []
        for epoch in range(self.epochs):
            size = self.size_at(epoch)
            if out and out[-1][2] == size:
                out[-1] = (out[-1][0], epoch + 1, size)
            else:
                out.append((epoch, epoch + 1, size))
        return out

    def check_bounded(self) -> None:
        """ValueError when the schedule has more than MAX_SIZES sizes (each one is compiled on its own)."""
        n = len(self.sizes())
        if n > MAX_SIZES:
            raise ValueError(f"{self.start} -> {self.final} px in steps of {self.size_step} px has {n} sizes, more "
                             f"than {MAX_SIZES} (each is compiled on its own): use a larger size step")

    def describe(self) -> str:
        """One line: ``224 -> 448 px in steps of 28 over the first 960 of 1600 epochs (9 sizes), fixed batch``."""
        if not self.grows:
            return f"{self.final} px throughout"
        return (f"{self.start} -> {self.final} px in steps of {self.size_step} px over the first {self.grow_epochs} "
                f"of {self.epochs} epochs ({len(self.sizes())} sizes), "
                + ("batch and lr x floor(L_final / L) at smaller sizes" if self.grow_batch == "tokens"
                   else "the same batch at every size"))


def fixed_schedule(size: int, epochs: int, patch: int) -> ResolutionSchedule:
    """The paper's setting: ``size`` px at every epoch."""
    return ResolutionSchedule(size, size, 0, epochs, patch)


def from_options(img_size: int, grow_from: Optional[int], grow_epochs: Optional[float], epochs: int, patch: int,
                 step: int = 0, grow_batch: str = "fixed") -> ResolutionSchedule:
    """The schedule a command's options describe: ``grow_from`` px (None or 0: the fixed ``img_size``) growing
    over ``grow_epochs`` epochs (None: 60% of ``epochs``)."""
    if not grow_from:
        return fixed_schedule(img_size, epochs, patch)
    grow = round(0.6 * epochs) if grow_epochs is None else int(grow_epochs)
    return ResolutionSchedule(grow_from, img_size, grow, epochs, patch, step, grow_batch)


def schedule_training_flops(name: str, schedule: ResolutionSchedule, mask_ratio: float = 0.75, check: bool = False,
                            **model_kwargs) -> Dict[str, object]:
    """Training FLOPs per image of one pass over the data at each size of ``schedule`` (mae-flops' analytic count),
    their sum over the epochs, and the same run at the final size throughout. ``check``: also the matmul FLOPs
    FlopCounterMode counts at each size (on the meta device), summed the same way (key ``counted``)."""
    runs = schedule.phases()
    reports = {size: count_flops(name, mask_ratio, check=check, img_size=size, **model_kwargs)
               for size in {size for _, _, size in runs} | {schedule.final}}
    per_size = {size: r.total("training") for size, r in reports.items()}
    phases = [{"first_epoch": a, "end_epoch": b, "img_size": size, "epochs": b - a,
               "train_flops_per_image": per_size[size]} for a, b, size in runs]
    total = sum(p["epochs"] * p["train_flops_per_image"] for p in phases)
    fixed = schedule.epochs * per_size[schedule.final]
    out = {"model": name, "start": schedule.start, "final": schedule.final, "grow_epochs": schedule.grow_epochs,
           "size_step": schedule.size_step, "epochs": schedule.epochs, "phases": phases,
           "train_flops_per_image": total, "fixed_final_flops_per_image": fixed, "fraction_of_fixed": total / fixed}
    if check:
        counted = {size: r.counter_check["training_counter"] for size, r in reports.items()}
        analytic = {size: r.counter_check["training_analytic"] for size, r in reports.items()}
        counted_total = sum(p["epochs"] * counted[p["img_size"]] for p in phases)
        analytic_total = sum(p["epochs"] * analytic[p["img_size"]] for p in phases)
        counted_fixed = schedule.epochs * counted[schedule.final]
        out["counted"] = {"train_matmul_flops_per_image": counted_total,
                          "analytic_matmul_flops_per_image": analytic_total,
                          "fixed_final_matmul_flops_per_image": counted_fixed,
                          "fraction_of_fixed": counted_total / counted_fixed,
                          "max_rel_diff": max(r.counter_check["training_rel_diff"] for r in reports.values())}
    return out

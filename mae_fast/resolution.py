"""Progressive resolution: the image size of each pretraining epoch, and what a schedule costs.

A schedule grows the image side linearly from ``start`` to ``final`` px over the first ``grow_epochs`` epochs,
then keeps ``final`` to the end; every size is a multiple of the patch size (MAE's sin-cos position tables are
functions of the patch grid, so the same weights train at each). The size changes only at epoch boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from .flops import count_flops


@dataclass(frozen=True)
class ResolutionSchedule:
    """Image side per epoch: ``start`` px at epoch 0, growing linearly to ``final`` by epoch ``grow_epochs``
    (rounded to the nearest multiple of ``patch``), then ``final`` until ``epochs``."""

    start: int
    final: int
    grow_epochs: int
    epochs: int
    patch: int

    def __post_init__(self) -> None:
        if self.patch < 1 or self.final % self.patch:
            raise ValueError(f"final size {self.final} px must be a multiple of the patch size {self.patch}")
        if not self.patch <= self.start <= self.final:
            raise ValueError(f"start size {self.start} px must be between the patch size {self.patch} and the "
                             f"final size {self.final}")
        if not 0 <= self.grow_epochs <= self.epochs or self.epochs < 1:
            raise ValueError(f"grow epochs {self.grow_epochs} must be between 0 and the epochs ({self.epochs}, >= 1)")

    def size_at(self, epoch: int) -> int:
        """The image side of epoch ``epoch`` (0-based)."""
        if epoch >= self.grow_epochs:
            return self.final
        side = self.start + (self.final - self.start) * epoch / self.grow_epochs
        return min(self.final, max(self.patch, self.patch * round(side / self.patch)))

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


def schedule_training_flops(name: str, schedule: ResolutionSchedule, mask_ratio: float = 0.75,
                            **model_kwargs) -> Dict[str, object]:
    """Training FLOPs per image of one pass over the data at each size of ``schedule`` (mae-flops' analytic count),
    their sum over the epochs, and the same run at the final size throughout."""
    runs = schedule.phases()
    per_size = {size: count_flops(name, mask_ratio, img_size=size, **model_kwargs).total("training")
                for size in {size for _, _, size in runs} | {schedule.final}}
    phases = [{"first_epoch": a, "end_epoch": b, "img_size": size, "epochs": b - a,
               "train_flops_per_image": per_size[size]} for a, b, size in runs]
    total = sum(p["epochs"] * p["train_flops_per_image"] for p in phases)
    fixed = schedule.epochs * per_size[schedule.final]
    return {"model": name, "start": schedule.start, "final": schedule.final, "grow_epochs": schedule.grow_epochs,
            "epochs": schedule.epochs, "phases": phases, "train_flops_per_image": total,
            "fixed_final_flops_per_image": fixed, "fraction_of_fixed": total / fixed}

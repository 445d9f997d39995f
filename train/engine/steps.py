"""Where an optimizer step falls in a run: the steps of every epoch (they differ between epochs when the batch
follows a resolution schedule), the run's total, and the fractional epoch of a step (the lr schedule's clock)."""
from __future__ import annotations

import bisect
import itertools
from typing import Any, List, Sequence, Tuple


class StepPlan:
    """Optimizer steps per epoch and the total (``max_steps`` caps it; 0: every epoch)."""

    def __init__(self, epoch_steps: Sequence[int], max_steps: int = 0):
        self.epoch_steps: List[int] = [int(n) for n in epoch_steps]
        self.first: List[int] = [0, *itertools.accumulate(self.epoch_steps)]  # first step of each epoch, then the end
        self.uniform = len(set(self.epoch_steps)) <= 1
        total = self.first[-1]
        self.total_steps = min(total, max_steps) if max_steps else total

    @classmethod
    def uniform_epochs(cls, steps_per_epoch: int, epochs: int, max_steps: int = 0) -> "StepPlan":
        """Every epoch ``steps_per_epoch`` steps (a run at one size and batch)."""
        return cls([steps_per_epoch] * epochs, max_steps)

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of ``epoch`` (0-based)."""
        return self.epoch_steps[min(epoch, len(self.epoch_steps) - 1)]

    def epoch_of(self, step: int) -> int:
        """The epoch that optimizer step ``step`` (0-based) runs in."""
        return min(bisect.bisect_right(self.first, step) - 1, len(self.epoch_steps) - 1)

    def progress(self, step: int) -> float:
        """Epochs done after ``step`` steps, fractional: ``step / steps_per_epoch`` when the epochs are equal."""
        if self.uniform:
            return step / self.epoch_steps[0]
        epoch = self.epoch_of(step)
        return epoch + (step - self.first[epoch]) / self.epoch_steps[epoch]

    def ends_epoch(self, step: int) -> bool:
        """Whether ``step`` steps end an epoch."""
        i = bisect.bisect_left(self.first, step)
        return step > 0 and i < len(self.first) and self.first[i] == step

    def epochs_done(self, step: int) -> int:
        """Whole epochs done after ``step`` steps."""
        return bisect.bisect_right(self.first, step) - 1


def plan_steps(cfg: Any, batches: Sequence[Tuple[int, int]]) -> StepPlan:
    """The :class:`StepPlan` of a run from ``cfg`` (accum_iter, epochs, max_steps: 0 = all epochs) and the
    (batches, batch size) of each epoch; ValueError naming the data when an epoch holds fewer batches than one
    accumulation."""
    for n, batch_size in batches:
        if n < cfg.accum_iter:
            raise ValueError(f"{cfg.data}: {n} batches of {batch_size} per process per epoch, fewer than "
                             f"--accum-iter {cfg.accum_iter}: use more images or a smaller batch")
    return StepPlan([n // cfg.accum_iter for n, _ in batches], cfg.max_steps)

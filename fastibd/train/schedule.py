"""Learning-rate schedules as a factor of the peak rate, evaluated every iteration."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def lr_factor(schedule: str, epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1,
              peak_epoch: float = 2.0) -> Callable[[float], float]:
    """factor(epoch) for a fractional epoch in [0, epochs].

    piecewise: gamma ** (milestones passed)          (paper: x0.1 at 100 and 150 of 200)
    onecycle:  0 -> 1 linearly until peak_epoch, then -> 0 at the end (FFCV's recipes)
    linear:    1 -> 0 linearly
    constant:  1
    """
    if schedule == "piecewise":
        marks = sorted(milestones)
        return lambda epoch: gamma ** sum(epoch >= m for m in marks)
    if schedule == "onecycle":
        peak = min(max(peak_epoch, 0.0), float(epochs))
        # Start a little above 0, so the first step is not wasted.
        return lambda epoch: float(np.interp(epoch, [0, peak, epochs], [0.1 if peak else 1, 1, 0]))
    if schedule == "linear":
        return lambda epoch: max(0.0, 1.0 - epoch / epochs)
    if schedule == "constant":
        return lambda epoch: 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def resolution_at(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int,
                  step: int = 32) -> int:
    """Progressive resizing (FFCV's ImageNet recipe): min_res until epoch start_ramp, then a
    linear ramp to max_res at end_ramp, rounded down to a multiple of `step` (so a compiled
    model sees a few distinct shapes, not one per epoch), never below min_res."""
    if max_res <= min_res:
        return min_res
    if end_ramp <= start_ramp:  # a jump
        return max_res if epoch >= end_ramp else min_res
    res = float(np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res]))
    return max(min_res, int(res) // step * step)

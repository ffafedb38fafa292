"""The optimizer and its learning-rate schedule (a factor of the peak rate, set at every
iteration), from the run's `optim` section."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fastibd.config import Choice, Flag, IntList, Number, option, section
from fastibd.errors import UserError


@section("optim", "SGD and the learning-rate schedule (per iteration)")
class OptimSettings:
    lr: float = option(Number(0, 100), "peak learning rate (for batch_size; scaled linearly "
                       "with the global batch if lr_scaling)", 0.1)
    momentum: float = option(Number(0, 1), "SGD momentum", 0.9)
    nesterov: bool = option(Flag(), "Nesterov momentum", False)
    weight_decay: float = option(Number(0, 1), "weight decay", 5e-4)
    decay_norm_and_bias: bool = option(Flag(), "decay every parameter, as the IBD code and "
                                       "paper (false: not the 1-D ones, norm weights and "
                                       "biases, as FFCV's ImageNet recipe)", True)
    schedule: str = option(Choice("piecewise", "onecycle", "linear", "constant"),
                           "piecewise: x gamma at milestones; onecycle: linear up to "
                           "peak_epoch then down to 0; linear: down to 0", "piecewise")
    milestones: tuple[int, ...] = option(IntList(), "piecewise: epochs where lr *= gamma",
                                         (100, 150))
    gamma: float = option(Number(0, 1), "piecewise: factor at each milestone", 0.1)
    peak_epoch: float = option(Number(0, 1e6), "onecycle: epoch of the peak", 2.0)
    lr_scaling: bool = option(Flag(), "scale lr by global batch / batch_size (several GPUs)",
                              False)


def check_optim(settings: OptimSettings) -> None:
    """The combinations each value alone does not rule out, refused in one line. (A
    peak_epoch past training.epochs is not one: a short trial of a onecycle recipe, e.g.
    `--cfg smoke --training.epochs 1`, then only warms up, as asked.)"""
    if settings.nesterov and settings.momentum == 0:
        raise UserError("optim.nesterov=true needs optim.momentum > 0 (Nesterov momentum "
                        "without momentum is plain SGD)")


def build_optimizer(module: nn.Module, settings: OptimSettings,
                    world_size: int = 1) -> torch.optim.SGD:
    """SGD over every parameter of `module`; with decay_norm_and_bias=false the 1-D ones
    (norm weights, biases) are not decayed."""
    decay, exempt = [], []
    for param in module.parameters():
        (exempt if param.ndim <= 1 and not settings.decay_norm_and_bias else decay).append(param)
    lr = settings.lr * (world_size if settings.lr_scaling else 1)
    return torch.optim.SGD([{"params": decay, "weight_decay": settings.weight_decay},
                            {"params": exempt, "weight_decay": 0.0}],
                           lr=lr, momentum=settings.momentum, nesterov=settings.nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimSettings, epochs: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of `settings`, stepped once per iteration."""
    factor = lr_factor(settings.schedule, epochs, settings.milestones, settings.gamma,
                       settings.peak_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: factor(step / steps_per_epoch))


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

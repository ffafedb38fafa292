"""What every fastibd model shares: normalization inside, logits or (logits, taps), shapes.

Inputs are always [0, 1] images: each model subtracts its own mean and divides by its own
std, so attack budgets are in pixel space whatever the model (docs/method.md). The buffers
are not saved in state_dicts, so foreign checkpoints load unchanged; the normalization is
part of the model's `ModelSpec` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fastibd.errors import UserError

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

NORMALIZATIONS: dict[str, Stats | None] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": None,
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: saved beside its weights in checkpoints."""

    arch: str
    num_classes: int
    normalization: str | Stats = "none"  # a name in NORMALIZATIONS, or explicit (mean, std)
    width_mult: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # architecture-specific, e.g. sub_block1
    # The input resolution it was trained for (square side; what evaluation must feed it).
    # None: not recorded (foreign files, older checkpoints): the architecture's convention.
    resolution: int | None = None
    # imagenet pipeline: the validation center crop (fraction of the shorter side) it was
    # evaluated with while training; None: not recorded, the usual 224/256.
    crop_ratio: float | None = None


def normalization_stats(normalization: str | Stats) -> Stats | None:
    if isinstance(normalization, str):
        if normalization not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {normalization!r}; "
                            f"choose from {', '.join(NORMALIZATIONS)}")
        return NORMALIZATIONS[normalization]
    mean, std = normalization
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"normalization needs 3 means and 3 positive stds, got {normalization}")
    return tuple(map(float, mean)), tuple(map(float, std))


class Normalize(nn.Module):
    """(x - mean) / std per channel; identity for normalization 'none'."""

    def __init__(self, normalization: str | Stats) -> None:
        super().__init__()
        stats = normalization_stats(normalization)
        self.enabled = stats is not None
        mean, std = stats if stats is not None else ((0.0,) * 3, (1.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.enabled else x


class TappedModel(nn.Module):
    """Base of all models: `model(x)` -> logits, `model(x, features=True)` -> (logits, taps).

    A tap is the output of one residual block (for pre-activation nets, the BN+ReLU'd input
    of the next block), the very tensor the network computes: no copy, same memory format.
    Subclasses implement `forward_taps(x, taps)`, appending taps when `taps` is a list.
    """

    spec: ModelSpec

    def __init__(self, normalization: str | Stats) -> None:
        super().__init__()
        self.normalize = Normalize(normalization)

    def forward_taps(self, x: torch.Tensor, taps: list[torch.Tensor] | None) -> torch.Tensor:
        raise NotImplementedError

    def set_normalization(self, normalization: str | Stats) -> None:
        """Change the input normalization (e.g. after finding what a foreign file needs)."""
        device = self.normalize.mean.device
        self.normalize = Normalize(normalization).to(device)
        if hasattr(self, "spec"):
            self.spec = replace(self.spec, normalization=normalization)

    def forward(self, x: torch.Tensor, features: bool = False):
        taps: list[torch.Tensor] | None = [] if features else None
        logits = self.forward_taps(self.normalize(x), taps)
        return (logits, taps) if features else logits

    @torch.no_grad()
    def feature_shapes(self, input_size: int | tuple[int, int]) -> list[tuple[int, int, int]]:
        """(C, H, W) of each tap for square `input_size` (or (H, W)), computed on the meta
        device: no arithmetic, no memory."""
        h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
        meta = {name: t.to("meta") for name, t in [*self.named_parameters(), *self.named_buffers()]}
        x = torch.empty(2, 3, h, w, device="meta")  # 2: train-mode BN rejects one value
        _, taps = functional_call(self, meta, (x,), {"features": True})
        return [tuple(t.shape[1:]) for t in taps]


def scaled(channels: int, width_mult: float) -> int:
    """A channel count times the width multiplier (tiny test models use e.g. 1/8)."""
    return max(1, round(channels * width_mult))


def run_preact_blocks(blocks: list[nn.Module], x: torch.Tensor, final_bn: nn.BatchNorm2d,
                      taps: list[torch.Tensor] | None) -> torch.Tensor:
    """Run pre-activation blocks (each with `activate` = BN+ReLU and `forward_activated`)
    then the final BN+ReLU. Block k's tap is block k+1's activated input, as AFD taps
    pre-activation nets: computed once, used by both the block and the loss."""
    for i, block in enumerate(blocks):
        activated = block.activate(x)
        if taps is not None and i > 0:
            taps.append(activated)
        x = block.forward_activated(activated, x)
    out = torch.relu(final_bn(x))
    if taps is not None:
        taps.append(out)
    return out

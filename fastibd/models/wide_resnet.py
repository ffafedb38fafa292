"""WideResNet (pre-activation) with the parameter names of the TRADES / RobustBench code:
conv1, blockN.layer.i.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc, and optionally the unused
`sub_block1` that TRADES and AWP checkpoints carry (built only so those files load strictly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastibd.models.base import Stats, TappedModel, run_preact_blocks, scaled
from fastibd.models.cifar_resnet import PreActBlock


class NetworkBlock(nn.Module):
    def __init__(self, count: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            PreActBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                        shortcut="convShortcut")
            for i in range(count)
        ])


class WideResNet(TappedModel):
    """WRN-depth-k for 32x32 inputs; (depth - 4) / 6 blocks per stage, one tap per block."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                 normalization: str | Stats = "none", width_mult: float = 1.0,
                 sub_block1: bool = False) -> None:
        super().__init__(normalization)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        count = (depth - 4) // 6
        widths = [scaled(c, width_mult) for c in (16, 16 * widen_factor, 32 * widen_factor,
                                                   64 * widen_factor)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(count, widths[0], widths[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(count, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(count, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(count, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward_taps(self, x: torch.Tensor, taps: list[torch.Tensor] | None) -> torch.Tensor:
        blocks = [b for stage in (self.block1, self.block2, self.block3) for b in stage.layer]
        out = run_preact_blocks(blocks, self.conv1(x), self.bn1, taps)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

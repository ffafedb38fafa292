"""CIFAR ResNet-18 and ResNet-34 (3x3 stem, no max-pool) and PreAct ResNet-18.

Parameter names follow the CIFAR code the robustness literature shares (RSLAD, IBD,
pyautoattack's example model): conv1, bn1, layerN.i.{conv1,bn1,conv2,bn2,shortcut}, linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastibd.models.base import Stats, TappedModel, run_preact_blocks, scaled

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
RESNET18_BLOCKS = (2, 2, 2, 2)  # basic blocks per stage
RESNET34_BLOCKS = (3, 4, 6, 3)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (PreAct ResNets, WideResNets), split so the model can
    reuse relu(bn1(x)) as the previous block's tap instead of computing it twice.

    A projection shortcut (stride or width change) sees the activated input, an identity
    shortcut the raw one, as in the PreAct and TRADES code. `shortcut` names the projection
    as the checkpoints people have do: "shortcut" (a Sequential holding the conv, PreAct
    ResNet code) or "convShortcut" (the conv itself, WideResNet / TRADES / RobustBench)."""

    def __init__(self, in_planes: int, planes: int, stride: int,
                 shortcut: str = "shortcut") -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.projection: str | None = None
        if stride != 1 or in_planes != planes:
            conv = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            self.add_module(shortcut, nn.Sequential(conv) if shortcut == "shortcut" else conv)
            self.projection = shortcut

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(x))

    def forward_activated(self, activated: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.projection is None else getattr(self, self.projection)(activated)
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_activated(self.activate(x), x)


def _stages(block: type[nn.Module], in_planes: int, width_mult: float,
            blocks: tuple[int, ...]) -> tuple[list[nn.Sequential], int]:
    stages = []
    for width, stride, count in zip(STAGE_WIDTHS, STAGE_STRIDES, blocks, strict=True):
        planes = scaled(width, width_mult)
        layers = []
        for i in range(count):
            layers.append(block(in_planes, planes, stride if i == 0 else 1))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    return stages, in_planes


class CifarResNet(TappedModel):
    """ResNet for 32x32 inputs; taps are the outputs of every block (after the final ReLU)."""

    def __init__(self, num_classes: int = 10, normalization: str | Stats = "cifar10",
                 width_mult: float = 1.0, blocks: tuple[int, ...] = RESNET18_BLOCKS) -> None:
        super().__init__(normalization)
        stem = scaled(STAGE_WIDTHS[0], width_mult)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages, out_planes = _stages(BasicBlock, stem, width_mult, blocks)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(out_planes, num_classes)

    def forward_taps(self, x: torch.Tensor, taps: list[torch.Tensor] | None) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                out = block(out)
                if taps is not None:
                    taps.append(out)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class PreActResNet(TappedModel):
    """PreAct ResNet (with the final BN+ReLU robust-training code uses, e.g. Rice et al.);
    taps are the BN+ReLU'd inputs of the next block, and the final BN+ReLU output."""

    def __init__(self, num_classes: int = 10, normalization: str | Stats = "cifar10",
                 width_mult: float = 1.0, blocks: tuple[int, ...] = RESNET18_BLOCKS) -> None:
        super().__init__(normalization)
        stem = scaled(STAGE_WIDTHS[0], width_mult)
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        stages, out_planes = _stages(PreActBlock, stem, width_mult, blocks)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(out_planes)
        self.linear = nn.Linear(out_planes, num_classes)

    def forward_taps(self, x: torch.Tensor, taps: list[torch.Tensor] | None) -> torch.Tensor:
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        blocks = [block for stage in stages for block in stage]
        out = run_preact_blocks(blocks, self.conv1(x), self.bn, taps)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

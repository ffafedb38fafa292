"""ImageNet ResNet-18/50 with torchvision's module names (conv1, bn1, layerN.i.*, fc), so
torchvision, RobustBench and robustness-library weights load directly. Built from
torchvision's own blocks, with a width multiplier for tiny test models."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from fastibd.models.base import Stats, TappedModel, scaled

STAGE_WIDTHS = (64, 128, 256, 512)


class ImageNetResNet(TappedModel):
    """Taps are the outputs of every residual block (after its final ReLU)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...],
                 num_classes: int = 1000, normalization: str | Stats = "imagenet",
                 width_mult: float = 1.0) -> None:
        super().__init__(normalization)
        self.inplanes = scaled(64, width_mult)
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = [self._make_layer(block, scaled(width, width_mult), count, 1 if i == 0 else 2)
                  for i, (width, count) in enumerate(zip(STAGE_WIDTHS, layers, strict=True))]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        for module in self.modules():  # torchvision's initialization
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, count: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        # torchvision's Bottleneck sizes its inner width from base_width=64; keep that ratio.
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward_taps(self, x: torch.Tensor, taps: list[torch.Tensor] | None) -> torch.Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                out = block(out)
                if taps is not None:
                    taps.append(out)
        return self.fc(torch.flatten(self.avgpool(out), 1))

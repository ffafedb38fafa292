"""ImageNet ResNet-18/50 with torchvision's module names (conv1, bn1, layerN.i.*, fc), so
torchvision, RobustBench and robustness-library weights load directly. Built from
torchvision's own blocks, with a width multiplier for tiny test models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from fastibd.models.base import Stats, TappedModel, scaled

STAGE_WIDTHS = (64, 128, 256, 512)


class ImageNetResNet(TappedModel):
    """Taps are the outputs of every residual block (after its final ReLU)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...],
                 num_classes: int = 1000, normalization: str | Stats = "imagenet",
                 width_mult: float = 1.0, blurpool: bool = False) -> None:
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
        if blurpool:
            add_blurpool(self)

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


BLUR_MIN_CHANNELS = 16  # FFCV's rule: the stem (3 channels) keeps its plain strided conv


class BlurConv2d(nn.Conv2d):
    """A strided convolution that low-pass filters its input first (BlurPool, Zhang 2019):
    less aliasing, a little more accuracy in FFCV's ImageNet recipe. A Conv2d subclass, so
    parameter names stay torchvision's and checkpoints load either way."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(kernel, kernel) / 16
        # Not persistent: a fixed filter, not a weight; state_dicts match plain ResNets.
        self.register_buffer("blur", kernel.expand(self.in_channels, 1, 3, 3).clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(blurred)


def add_blurpool(model: nn.Module) -> None:
    """Swap every strided convolution with at least BLUR_MIN_CHANNELS inputs for a
    BlurConv2d holding the same weights."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if (type(child) is nn.Conv2d and max(child.stride) > 1
                    and child.in_channels >= BLUR_MIN_CHANNELS):
                blur = BlurConv2d(child.in_channels, child.out_channels, child.kernel_size,
                                  child.stride, child.padding, child.dilation, child.groups,
                                  child.bias is not None).to(child.weight.device)
                blur.load_state_dict(child.state_dict())
                setattr(parent, name, blur)

"""Tiny real-data models shared by the attack and evaluation tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastibd.data.sources import digits_dataset


class BNNet(nn.Module):
    """Tiny conv net with BatchNorm and the project's model API (x in [0, 1], 8x8 input)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor, features: bool = False):
        z1 = self.block1(x)
        z2 = self.block2(z1)
        logits = self.head(z2.flatten(1))
        return (logits, [z1, z2]) if features else logits


class TapNet(nn.Module):
    """Tiny conv net with the project's model API: model(x) -> logits,
    model(x, features=True) -> (logits, taps); one tap per stage (conv, optional BatchNorm,
    ReLU), stride 2 after the first. `seed` fixes the initial weights."""

    def __init__(self, widths: tuple[int, ...], batchnorm: bool = False,
                 seed: int | None = None, num_classes: int = 10) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        stages, c_in = [], 3
        for k, width in enumerate(widths):
            norm = [nn.BatchNorm2d(width)] if batchnorm else []
            stages.append(nn.Sequential(nn.Conv2d(c_in, width, 3, 1 if k == 0 else 2, 1),
                                        *norm, nn.ReLU()))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor, features: bool = False):
        taps = []
        for stage in self.stages:
            x = stage(x)
            taps.append(x)
        logits = self.head(x.mean((2, 3)))
        return (logits, taps) if features else logits


def digits_8px(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits at 8x8 (their native size), full contrast: the brightest pixel of
    each image is exactly 1, the background exactly 0."""
    data = digits_dataset(split)
    x = F.avg_pool2d(torch.from_numpy(data.images).permute(0, 3, 1, 2).float(), 4)
    return x / x.amax(dim=(1, 2, 3), keepdim=True), torch.from_numpy(data.labels)


def trained_bnnet(steps: int = 150) -> BNNet:
    """A BNNet trained briefly (Adam, fixed seeds) on 8x8 digits: ~97% val accuracy. Returned
    in train mode with gradients enabled and cleared."""
    torch.manual_seed(0)
    x_train, y_train = digits_8px("train")
    model = BNNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (128,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model

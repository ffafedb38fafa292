"""CIFAR-style training augmentation on the device: random crop of the 4 px zero-padded
image and a random horizontal flip.

FFCV's own augmentations draw from numba's unseeded per-thread generators, so two runs (or a
run and its resumption) would see different crops. Here each batch draws from a generator
seeded by (seed, epoch, batch index): a run is reproducible from its seed and resumes
exactly, with no generator state to save; on a GPU it costs microseconds.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastibd.data.options import CIFAR_PAD
from fastibd.seeding import derived_seed


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop of the zero-padded batch back to its size, and a random horizontal flip.

    x: [B, C, H, W]; every image gets its own offset in [0, 2 * padding] and its own flip.
    The result keeps x's memory format.
    """
    b, _, h, w = x.shape
    device = x.device
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=generator.device)
    flip = torch.rand(b, generator=generator, device=generator.device) < 0.5
    dy, dx, flip = dy.to(device), dx.to(device), flip.to(device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]  # [B, 1, H, 1]
    cols = torch.arange(w, device=device).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    cols = cols[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    return out.contiguous(memory_format=_format(x))


class CropFlip:
    """The cifar pipeline's training loader: `source`'s batches, cropped and flipped on
    their device. A Loader (fastibd.data) like its source. `rank` (of a distributed run)
    gives each process its own crops."""

    def __init__(self, source, seed: int | None, rank: int = 0, padding: int = CIFAR_PAD
                 ) -> None:
        self.source = source
        self.seed = int(np.random.SeedSequence().entropy % 2**31) if seed is None else seed
        self.rank = rank
        self.padding = padding
        self.next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch
        self.source.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        for index, (x, y) in enumerate(self.source):
            seed = derived_seed(self.seed, self.rank, epoch, index)
            generator = torch.Generator(x.device).manual_seed(seed)
            yield random_crop_flip(x, self.padding, generator), y


def _format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format

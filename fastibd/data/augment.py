"""CIFAR-style augmentation on the device, from a torch.Generator.

FFCV's own augmentations draw from numba's unseeded per-thread generators, so two runs
(or a run and its resumption) see different crops. Done here instead, a training run is
reproducible from its seed and resumes exactly; on a GPU it costs microseconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastibd.data.options import CIFAR_PAD


def training_batch(x: torch.Tensor, pipeline: str, memory_format: torch.memory_format,
                   generator: torch.Generator) -> torch.Tensor:
    """A loader batch as the training step takes it: in the training memory format, and for
    the cifar pipeline cropped (4 px zero padding) and flipped here, where it is seeded. The
    imagenet pipeline's random resized crop happens inside FFCV."""
    x = x.contiguous(memory_format=memory_format)
    if pipeline == "cifar":
        x = random_crop_flip(x, CIFAR_PAD, generator)
    return x


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
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


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format

"""What every loader takes, and the constants of the two pipelines."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

Order = Literal["random", "quasi_random", "sequential"]
CIFAR_PAD = 4
DEFAULT_CROP_RATIO = 224 / 256


@dataclass(frozen=True)
class LoaderOptions:
    """What every loader takes besides its augmentation."""

    batch_size: int
    device: torch.device | str = "cpu"
    num_workers: int = min(8, os.cpu_count() or 1)
    distributed: bool = False  # FFCV's flag: each rank reads its own share (pads with repeats)
    drop_last: bool = False
    order: Order = "random"
    os_cache: bool = True  # True when the dataset fits in RAM; False streams with QUASI_RANDOM
    seed: int | None = None  # ordering seed; set it for reproducible (and distributed) runs
    dtype: torch.dtype = torch.float32
    indices: tuple[int, ...] | None = None  # read only these samples (e.g. a held-out slice)

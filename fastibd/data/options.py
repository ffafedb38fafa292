"""What every loader takes, and the constants of the two pipelines."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fastibd.config import Choice, Flag, Integer, Number, Text, option, section
from fastibd.errors import require_file

Order = Literal["random", "quasi_random", "sequential"]
CIFAR_PAD = 4
DATASET_SUFFIXES = (".beton", ".npz")  # what write_ffcv.py writes
DEFAULT_CROP_RATIO = 224 / 256


def dataset_file(path: str | Path) -> Path:
    """`path` as a dataset file that exists (.beton or .npz), or a one-line UserError that
    says how to write one (with --format npz for an .npz path)."""
    how = " --format npz" if Path(path).suffix == ".npz" else ""
    return require_file(path, "dataset file", f"; write one with data_prep/write_ffcv.py{how}",
                        DATASET_SUFFIXES)


@dataclass(frozen=True)
class LoaderOptions:
    """What every loader takes besides its augmentation."""

    batch_size: int
    device: torch.device | str = "cpu"
    num_workers: int = min(8, os.cpu_count() or 1)
    distributed: bool = False  # FFCV's flag: each rank reads its own share (pads with repeats)
    drop_last: bool = False
    order: Order = "random"
    os_cache: bool = True  # True when the dataset fits in RAM (False: FFCV reads pages itself)
    seed: int | None = None  # ordering seed; set it for reproducible (and distributed) runs
    dtype: torch.dtype = torch.float32
    indices: tuple[int, ...] | None = None  # read only these samples (e.g. a held-out slice)


@section("data", "Datasets (.beton or .npz files from data_prep/write_ffcv.py)")
class DataSettings:
    train_path: str = option(Text(), "training .beton (or .npz)")
    val_path: str = option(Text(), "validation .beton (or .npz): the final report only, never "
                           "model selection")
    pipeline: str = option(Choice("cifar", "imagenet"), "augmentation: cifar = crop+flip, "
                           "imagenet = random resized crop+flip", "cifar")
    holdout: int = option(Integer(0), "training images held out (never trained on) to pick the "
                          "best checkpoint by PGD accuracy", 1000)
    batch_size: int = option(Integer(1), "batch size per process", 128)
    num_workers: int = option(Integer(1), "FFCV decoding threads", 8)
    os_cache: bool = option(Flag(), "let the OS cache the .beton (dataset fits in RAM)", True)
    min_res: int = option(Integer(8), "imagenet pipeline: training resolution (the start of "
                          "progressive resizing)", 160)
    max_res: int = option(Integer(0), "imagenet pipeline: final training resolution of "
                          "progressive resizing (0: no resizing)", 0)
    start_ramp: int = option(Integer(0), "progressive resizing: epoch the ramp from min_res "
                             "starts", 0)
    end_ramp: int = option(Integer(0), "progressive resizing: epoch max_res is reached", 0)
    res_step: int = option(Integer(1), "progressive resizing: resolutions are multiples of this",
                           32)
    val_res: int = option(Integer(8), "imagenet pipeline: validation resolution", 224)
    val_crop_ratio: float = option(Number(0.01, 1), "imagenet pipeline: validation center crop, "
                                   "as a fraction of the shorter side", DEFAULT_CROP_RATIO)


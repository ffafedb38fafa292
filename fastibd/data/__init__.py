"""Datasets in, training batches out: `(images, labels)` on the device.

Images are float in [0, 1], NCHW shape in channels_last memory; labels int64 [B]. A dataset
is a .beton (FFCV, `fastibd.data.ffcv_loaders`) or an .npz held on the device
(`fastibd.data.tensor_loader`, for machines without FFCV); the functions here pick by the
file's suffix. `data_prep/write_ffcv.py` writes both (`fastibd.data.sources` and `.beton`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastibd.data.ffcv_loaders import (
    ImageNetTrainLoader,
    beton_labels,
    beton_resolution,
    cifar_beton_loader,
    imagenet_val_loader,
    is_npz,
    keep_torch_threads,
)
from fastibd.data.options import CIFAR_PAD, DEFAULT_CROP_RATIO, LoaderOptions
from fastibd.data.tensor_loader import TensorLoader, npz_labels, npz_resolution

__all__ = ["CIFAR_PAD", "DEFAULT_CROP_RATIO", "ImageNetTrainLoader", "LoaderOptions",
           "TensorLoader", "cifar_loader", "dataset_labels", "dataset_resolution",
           "imagenet_val_loader", "keep_torch_threads", "set_epoch"]


def cifar_loader(path: str | Path, train: bool, options: LoaderOptions):
    """CIFAR-like data: train = random crop (4 px zero padding) + flip; val = as stored.
    A `.npz` file is served from device memory (TensorLoader), a .beton by FFCV."""
    if is_npz(path):
        return TensorLoader(path, options, augment=train)
    return cifar_beton_loader(path, train, options)


def dataset_labels(path: str | Path) -> np.ndarray:
    """Every label of a .beton (from its metadata, no image decoded) or an .npz."""
    return npz_labels(path) if is_npz(path) else beton_labels(path)


def dataset_resolution(path: str | Path) -> int:
    """The side of the square images of a fixed-size .beton or .npz (the cifar pipeline's
    input)."""
    return npz_resolution(path) if is_npz(path) else beton_resolution(path)


def set_epoch(loader, epoch: int) -> None:
    """Make the next pass over an FFCV loader (or a TensorLoader) use `epoch`'s shuffle (its
    order is seeded by seed + epoch), as DistributedSampler.set_epoch does; needed when a run
    resumes."""
    target = loader.loader if isinstance(loader, ImageNetTrainLoader) else loader
    target.next_epoch = epoch

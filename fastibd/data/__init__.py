"""Datasets in, batches out: `make_loader(path, pipeline, split, options)`.

Every loader is a `Loader`: it yields `(images, labels)` on the device (images float in
[0, 1], NCHW shape in channels_last memory; labels int64 [B]), has a length in batches, and
`set_epoch(epoch)` makes its next pass the one of that epoch (order, the cifar pipeline's
augmentation and, for progressive resizing, resolution), which is how a run resumes; the
imagenet pipeline's random resized crops come from FFCV's unseeded generator.

A dataset is a .beton (FFCV, fastibd.data.ffcv_loaders) or an .npz held on the device
(fastibd.data.tensor_loader, for machines without FFCV), picked by the file's suffix. Two
pipelines: `cifar` (images as stored; training adds the random crop + flip of
fastibd.data.augment, on the device) and `imagenet` (FFCV's random resized crop + flip for
training, a center crop for evaluation). `data_prep/write_ffcv.py` writes the files
(fastibd.data.sources, fastibd.data.beton).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fastibd.data.augment import CropFlip
from fastibd.data.ffcv_loaders import (
    ImageNetTrainLoader,
    beton_labels,
    beton_resolution,
    cifar_beton_loader,
    imagenet_val_loader,
    is_npz,
    keep_torch_threads,
)
from fastibd.data.options import (
    CIFAR_PAD,
    DATASET_SUFFIXES,
    DEFAULT_CROP_RATIO,
    DataSettings,
    LoaderOptions,
    dataset_file,
)
from fastibd.data.tensor_loader import TensorLoader, npz_labels, npz_resolution
from fastibd.errors import UserError
from fastibd.seeding import derived_seed

__all__ = ["CIFAR_PAD", "DATASET_SUFFIXES", "DEFAULT_CROP_RATIO", "PIPELINES", "SPLITS",
           "DataSettings", "ImageNetTrainLoader", "Loader", "LoaderOptions", "TensorLoader",
           "TrainingData", "dataset_file",
           "dataset_labels", "dataset_resolution", "first_examples", "imagenet_val_loader",
           "keep_torch_threads", "make_loader", "resolution_at", "training_data"]

PIPELINES = ("cifar", "imagenet")
SPLITS = ("train", "eval")
HOLDOUT_SEED = 20231  # fixed: the held-out slice must not change when training.seed does
# The loaders order epoch e by seed + e (FFCV's rule): fed the run's seed itself, seed 1
# would replay seed 0's orders one epoch later. They get a seed derived from it instead.
DATA_ORDER_STREAM = 0x0D47A


class Loader(Protocol):
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...


def make_loader(path: str | Path, pipeline: str, split: str, options: LoaderOptions, *,
                resolution: int = 224, crop_ratio: float = DEFAULT_CROP_RATIO,
                resolution_at: Callable[[int], int] | None = None) -> Loader:
    """The loader of `pipeline` ("cifar" or "imagenet") for `split` ("train": augmented;
    "eval": as the model is evaluated). For imagenet, `resolution` is the output size
    (training: the first epoch's; `resolution_at(epoch)` makes it progressive) and
    `crop_ratio` the evaluation center crop."""
    if pipeline not in PIPELINES or split not in SPLITS:
        raise ValueError(f"pipeline must be one of {PIPELINES} and split one of {SPLITS}, "
                         f"got {pipeline!r}, {split!r}")
    if pipeline == "imagenet":
        if split == "train":
            return ImageNetTrainLoader(path, resolution, options, resolution_at)
        return imagenet_val_loader(path, options, resolution, crop_ratio)
    stored = TensorLoader(path, options) if is_npz(path) else cifar_beton_loader(path, options)
    if split == "eval":
        return stored
    rank = dist.get_rank() if options.distributed and dist.is_initialized() else 0
    return CropFlip(stored, options.seed, rank)


def first_examples(path: str | Path, pipeline: str, n: int, batch_size: int,
                   device: torch.device, resolution: int = 224, workers: int = 8,
                   crop_ratio: float | None = None) -> Loader:
    """The first n examples of a dataset file in stored order, as a model is evaluated
    (imagenet: the central `crop_ratio` of the shorter side, as the run's data.val_crop_ratio;
    None: 224/256)."""
    options = LoaderOptions(batch_size=batch_size, device=device, num_workers=workers,
                            order="sequential", indices=tuple(range(n)))
    return make_loader(path, pipeline, "eval", options, resolution=resolution,
                       crop_ratio=crop_ratio or DEFAULT_CROP_RATIO)


def dataset_labels(path: str | Path) -> np.ndarray:
    """Every label of a .beton (from its metadata, no image decoded) or an .npz."""
    return npz_labels(path) if is_npz(path) else beton_labels(path)


def dataset_resolution(path: str | Path) -> int:
    """The side of the square images of a fixed-size .beton or .npz (the cifar pipeline's
    input)."""
    return npz_resolution(path) if is_npz(path) else beton_resolution(path)


def resolution_at(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int,
                  step: int = 32) -> int:
    """Progressive resizing, as ffcv-imagenet's `get_resolution`: min_res up to epoch
    start_ramp, max_res from end_ramp on, in between the linear ramp rounded to the nearest
    multiple of `step` (so a compiled model sees a few distinct shapes), kept in
    [min_res, max_res]."""
    if max_res <= min_res or epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    res = float(np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res]))
    return min(max_res, max(min_res, int(np.round(res / step)) * step))


@dataclass
class TrainingData:
    """What a training run reads: its three loaders and what they hold."""

    train: Loader
    holdout: Loader | None  # images held out of the training set, to pick the best checkpoint
    val: Loader  # the final report only
    num_classes: int
    input_size: int  # the resolution the models first see (feature shapes are taken there)
    eval_size: int  # the resolution evaluation feeds them (checkpoints record it)


def training_data(settings: DataSettings, device: torch.device, seed: int,
                  distributed: bool = False) -> TrainingData:
    """The run's loaders: training images minus `settings.holdout` of them (a fixed random
    slice, whatever the run's seed), in random order with drop_last; the held-out slice and
    the validation set in order. Bad data fails here, before any model is built."""
    train_labels = dataset_labels(settings.train_path)
    val_labels = dataset_labels(settings.val_path)
    num_classes = int(train_labels.max()) + 1
    if val_labels.max() >= num_classes:
        raise UserError(f"{settings.val_path} has label {val_labels.max()}, but the training "
                        f"data has only {num_classes} classes")
    if settings.max_res and settings.max_res < settings.min_res:
        raise UserError(f"data.max_res={settings.max_res} is below data.min_res="
                        f"{settings.min_res} (progressive resizing only grows)")
    if settings.holdout >= len(train_labels):
        raise UserError(f"data.holdout={settings.holdout} leaves nothing to train on "
                        f"({len(train_labels)} training images)")
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(train_labels))
    holdout_indices = tuple(sorted(order[:settings.holdout].tolist()))
    train_indices = tuple(sorted(order[settings.holdout:].tolist()))

    def options(**overrides) -> LoaderOptions:
        return LoaderOptions(**{"batch_size": settings.batch_size, "device": device,
                                "num_workers": settings.num_workers,
                                "os_cache": settings.os_cache,
                                "seed": derived_seed(seed, DATA_ORDER_STREAM), **overrides})

    def schedule(epoch: int) -> int:
        return resolution_at(epoch, settings.min_res, settings.max_res, settings.start_ramp,
                             settings.end_ramp, settings.res_step)

    evaluation = dict(order="sequential", batch_size=max(settings.batch_size, 256))
    sizes = dict(resolution=settings.val_res, crop_ratio=settings.val_crop_ratio)
    pipeline = settings.pipeline
    if pipeline == "cifar":  # images as stored: both sets must have the same size
        input_size = eval_size = dataset_resolution(settings.train_path)
        val_size = dataset_resolution(settings.val_path)
        if val_size != input_size:
            raise UserError(f"{settings.val_path} holds {val_size}-px images, "
                            f"{settings.train_path} {input_size}-px ones")
    else:
        input_size, eval_size = settings.min_res, settings.val_res
    train = make_loader(settings.train_path, pipeline, "train",
                        options(indices=train_indices, drop_last=True, distributed=distributed),
                        resolution=settings.min_res, resolution_at=schedule)
    holdout = make_loader(settings.train_path, pipeline, "eval",
                          options(indices=holdout_indices, **evaluation), **sizes) \
        if holdout_indices else None
    val = make_loader(settings.val_path, pipeline, "eval", options(**evaluation), **sizes)
    return TrainingData(train, holdout, val, num_classes, input_size, eval_size)

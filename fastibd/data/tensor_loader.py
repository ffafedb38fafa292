"""Small datasets held on the device, for machines without FFCV (it cannot be built
everywhere): a `.npz` with `images` [N, H, W, 3] uint8 and `labels` [N] integers, written by
`python data_prep/write_ffcv.py --format npz`. CIFAR-sized data fit in GPU memory many
times over, and batching them there costs nothing next to a robust-training step.

`TensorLoader` keeps the contract of the FFCV loaders (fastibd.data.ffcv_loaders): float
images in [0, 1], NCHW shape in channels_last memory, int64 labels, on the requested device;
order seeded by seed + epoch; `distributed` gives each rank its own share, padded with
repeats to the same length on every rank (as FFCV does).
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastibd.data.options import LoaderOptions, dataset_file
from fastibd.errors import UserError


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, H, W, 3] uint8, labels [N] int64), checked. A run asks for the same file
    several times (labels, resolution, then the train and held-out loaders): the last two
    files read are kept, and reread only when they change on disk. Callers must not modify
    the arrays."""
    path = dataset_file(path)
    stat = path.stat()
    try:
        return _read_checked(path.resolve(), stat.st_mtime_ns, stat.st_size)
    except _BadFile as err:
        raise UserError(f"{path}{err}") from None


class _BadFile(Exception):
    """What is wrong with a file, worded to follow its path."""


@functools.lru_cache(maxsize=2)  # a run's train and val files
def _read_checked(path: Path, _mtime_ns: int, _size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise _BadFile(" is not a dataset .npz with arrays images and labels "
                       f"({str(err).splitlines()[0]})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise _BadFile(f": images must be uint8 [N, H, W, 3], not {images.dtype} "
                       f"{list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise _BadFile(f": labels must be {len(images)} integers, not {labels.dtype} "
                       f"{list(labels.shape)}")
    if len(labels) and labels.min() < 0:
        raise _BadFile(f": labels must be >= 0, found {labels.min()}")
    return images, labels.astype(np.int64)


def write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically: a crash leaves the old file or none, never half of one."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        np.savez(file, images=images, labels=labels)
    partial.replace(path)


class TensorLoader:
    """Batches of an .npz dataset, on the device, as stored (the cifar pipeline's training
    augmentation wraps it: fastibd.data.augment.CropFlip)."""

    def __init__(self, path: str | Path, options: LoaderOptions) -> None:
        images, labels = read_npz(path)
        if options.indices is not None:
            keep = np.asarray(options.indices, dtype=np.int64)
            images, labels = images[keep], labels[keep]
        self.device = torch.device(options.device)
        self.images = torch.from_numpy(images).to(self.device)  # NHWC: batches are channels_last
        self.labels = torch.from_numpy(labels).to(self.device)
        self.options = options
        self.next_epoch = 0
        self.rank, self.world = ((dist.get_rank(), dist.get_world_size())
                                 if options.distributed and dist.is_initialized() else (0, 1))

    def set_epoch(self, epoch: int) -> None:
        """The next pass uses `epoch`'s order (seed + epoch), as after `epoch` passes."""
        self.next_epoch = epoch

    def _order(self, epoch: int) -> torch.Tensor:
        count = len(self.labels)
        if self.options.order == "sequential":
            order = torch.arange(count)
        elif not self.options.distributed:  # FFCV's Random order: numpy's permutation
            seed = None if self.options.seed is None else self.options.seed + epoch
            order = torch.from_numpy(np.random.default_rng(seed).permutation(count))
        else:  # FFCV's distributed Random order: DistributedSampler's torch.randperm
            gen = torch.Generator()
            if self.options.seed is None:
                gen.seed()  # unseeded, like FFCV without a seed
            else:
                gen.manual_seed(self.options.seed + epoch)
            order = torch.randperm(count, generator=gen)
        if self.world > 1:  # every rank the same length: pad with the order's first samples
            order = torch.cat([order, order[:self._share() * self.world - count]])
            order = order[self.rank::self.world]
        return order

    def _share(self) -> int:
        """Samples per rank: all of them on one rank, else a ceil-divided share."""
        return -(-len(self.labels) // self.world)

    def __len__(self) -> int:
        share, batch = self._share(), self.options.batch_size
        return share // batch if self.options.drop_last else -(-share // batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order(self.next_epoch).to(self.device)
        self.next_epoch += 1
        batch = self.options.batch_size
        for start in range(0, len(self) * batch, batch):
            picked = order[start:start + batch]
            # uint8 NHWC -> NCHW view in channels_last memory -> float in [0, 1]
            x = self.images[picked].permute(0, 3, 1, 2).to(self.options.dtype).div_(255)
            yield x, self.labels[picked]


def npz_labels(path: str | Path) -> np.ndarray:
    return read_npz(path)[1]


def npz_resolution(path: str | Path) -> int:
    """The side of the dataset's square images (the cifar pipeline's input)."""
    images, _ = read_npz(path)
    height, width = images.shape[1:3]
    if height != width:
        raise UserError(f"{path} holds {height}x{width} images; the cifar pipeline needs "
                        "square ones")
    return height


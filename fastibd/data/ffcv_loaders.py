"""FFCV loaders (.beton files) that yield `(images, labels)` ready for a training step.

Images come out as float in [0, 1], NCHW shape in channels_last memory, on the requested
device; labels as int64 [B]. Normalization is *not* done here: every model owns its
mean/std, so attack budgets are always in pixel space (docs/method.md). ffcv is imported
only inside these functions: the package works without it for .npz data.

FFCV reuses its output buffers: a batch is valid until the next one is drawn, so
`.clone()` anything kept across iterations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from fastibd.data.options import DEFAULT_CROP_RATIO, LoaderOptions, dataset_file
from fastibd.errors import UserError


class BetonLoader:
    """An FFCV Loader with the Loader contract (fastibd.data): iterate, len, set_epoch."""

    def __init__(self, path: str | Path, image_ops: list, options: LoaderOptions) -> None:
        self.loader = _loader(path, image_ops, options)

    def set_epoch(self, epoch: int) -> None:
        """The next pass uses `epoch`'s order (FFCV seeds it by seed + epoch)."""
        self.loader.next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def cifar_beton_loader(path: str | Path, options: LoaderOptions) -> BetonLoader:
    """A fixed-size .beton as stored (the cifar pipeline augments on the device)."""
    keep_torch_threads()  # before the first ffcv import, which sets torch's threads to 1
    from ffcv.fields.decoders import SimpleRGBImageDecoder

    return BetonLoader(path, [SimpleRGBImageDecoder()], options)


class ImageNetTrainLoader(BetonLoader):
    """ImageNet-like training data: random resized crop + flip, at a resolution that may
    change between epochs (progressive resizing): `resolution_at(epoch)` is applied by
    `set_epoch`, or set one with `set_resolution` before iterating."""

    def __init__(self, path: str | Path, resolution: int, options: LoaderOptions,
                 resolution_at: Callable[[int], int] | None = None) -> None:
        needs_beton(path, "the imagenet pipeline")
        keep_torch_threads()
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip

        self.decoder = RandomResizedCropRGBImageDecoder((resolution, resolution))
        self.resolution_at = resolution_at
        super().__init__(path, [self.decoder, RandomHorizontalFlip()], options)

    @property
    def resolution(self) -> int:
        return self.decoder.output_size[0]

    def set_resolution(self, resolution: int) -> None:
        self.decoder.output_size = (resolution, resolution)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.resolution_at is not None:
            self.set_resolution(self.resolution_at(epoch))


def imagenet_val_loader(path: str | Path, options: LoaderOptions, resolution: int = 224,
                        crop_ratio: float = DEFAULT_CROP_RATIO) -> BetonLoader:
    """ImageNet-like validation data: the central `crop_ratio` of the shorter side, resized."""
    needs_beton(path, "the imagenet pipeline")
    keep_torch_threads()
    from ffcv.fields.decoders import CenterCropRGBImageDecoder

    decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio)
    return BetonLoader(path, [decoder], options)


def keep_torch_threads() -> None:
    """Stop FFCV from changing torch's intra-op thread count. FFCV sets it to 1 when first
    imported and to its worker count at every epoch, also from its batch-making thread: on a
    small machine that oversubscribes the cores the training step needs and changes CPU
    results behind the caller's back. Its decoders only need numba's threads, so its thread
    setter is narrowed to those. Call before anything imports ffcv."""
    threads = torch.get_num_threads()
    try:
        from ffcv.pipeline.compiler import Compiler  # importing it sets torch's threads to 1
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("ffcv"):
            raise
        raise UserError("FFCV is not installed, and .beton files need it (README: "
                        "set-up); without it, write and read .npz files: "
                        "data_prep/write_ffcv.py --format npz") from None

    torch.set_num_threads(threads)
    if getattr(Compiler, "keeps_torch_threads", False):
        return

    def set_numba_threads(cls, n: int) -> None:
        import numba

        # numba refuses more threads than the machine has (a recipe's 12 on a small box)
        cap = numba.config.NUMBA_NUM_THREADS
        cls.num_threads = min(n, cap) if n >= 1 else min(os.cpu_count() or 1, cap)
        numba.set_num_threads(cls.num_threads)

    Compiler.set_num_threads = classmethod(set_numba_threads)
    Compiler.keeps_torch_threads = True


def _loader(path: str | Path, image_ops: list, options: LoaderOptions):
    keep_torch_threads()
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage
    from torchvision.transforms import Normalize

    path = dataset_file(path)
    if options.order == "quasi_random" and options.distributed:
        raise UserError("order quasi_random cannot be used with distributed loading (FFCV); "
                        "use random")
    orders = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
              "sequential": OrderOption.SEQUENTIAL}
    if options.order not in orders:
        raise UserError(f"order must be one of {', '.join(orders)}, not {options.order!r}")
    device = torch.device(options.device)
    # Decode and augment as uint8 on the CPU, move, then convert on the device: uint8 is a
    # quarter of float32's bytes to transfer.
    image = [
        *image_ops,
        ToTensor(),
        ToDevice(device, non_blocking=True),
        ToTorchImage(channels_last=True),
        Convert(options.dtype),
        Normalize(mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0)),  # -> [0, 1]
    ]
    label = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True), Squeeze(1)]
    loader = Loader(
        str(path),
        batch_size=options.batch_size,
        num_workers=options.num_workers,
        order=orders[options.order],
        os_cache=options.os_cache,
        distributed=options.distributed,
        seed=options.seed,
        drop_last=options.drop_last,
        indices=None if options.indices is None else np.asarray(options.indices),
        pipelines={"image": image, "label": label},
    )
    return loader


def is_npz(path: str | Path) -> bool:
    return Path(path).suffix == ".npz"


def needs_beton(path: str | Path, what: str) -> None:
    if is_npz(path):
        raise UserError(f"{path}: {what} needs a .beton (FFCV); .npz files serve the cifar "
                        "pipeline only")


def beton_labels(path: str | Path) -> np.ndarray:
    """Every label in a .beton, read from its metadata table (no image is decoded)."""
    keep_torch_threads()
    from ffcv.reader import Reader

    path = dataset_file(path)
    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001 - FFCV raises assorted errors on foreign bytes
        raise UserError(f"{path} is not a readable .beton file ({err})") from None
    names = list(reader.handlers)
    if names != ["image", "label"]:
        raise UserError(f"{path} has fields {names}; expected image and label")
    return np.asarray(reader.metadata[f"f{names.index('label')}"])


def beton_resolution(path: str | Path) -> int:
    """The side of the square images of a fixed-size .beton (the cifar pipeline's input)."""
    keep_torch_threads()
    from ffcv.reader import Reader

    reader = Reader(str(path))
    image_field = reader.metadata["f0"]
    sizes = set(zip(image_field["height"].tolist(), image_field["width"].tolist(), strict=True))
    if len(sizes) != 1:
        raise UserError(f"{path} holds images of several sizes; the cifar pipeline needs one "
                        "size (use data.pipeline=imagenet)")
    (height, width), = sizes
    if height != width:
        raise UserError(f"{path} holds {height}x{width} images; the cifar pipeline needs "
                        "square ones")
    return height

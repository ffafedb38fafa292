"""FFCV loaders that yield `(images, labels)` ready for a robust-training step (and, for
`.npz` files, fastibd.tensor_data's on-device loader with the same contract).

Images come out as float in [0, 1], NCHW shape in channels_last memory, on the requested
device; labels as int64 [B]. Normalization is *not* done here: every model owns its
mean/std, so attack budgets are always in pixel space (docs/method.md).

FFCV reuses its output buffers: a batch is valid until the next one is drawn, so
`.clone()` anything kept across iterations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fastibd.errors import UserError

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


def cifar_loader(path: str | Path, train: bool, options: LoaderOptions):
    """CIFAR-like 32x32 data: train = random crop (4 px zero padding) + flip; val = as stored.
    A `.npz` file is served from device memory instead (fastibd.tensor_data)."""
    if _is_npz(path):
        from fastibd.tensor_data import TensorLoader

        return TensorLoader(path, options, augment=train)
    keep_torch_threads()  # before the first ffcv import, which sets torch's threads to 1
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate

    augment = [RandomHorizontalFlip(), RandomTranslate(padding=CIFAR_PAD)] if train else []
    return _loader(path, [SimpleRGBImageDecoder(), *augment], options)


class ImageNetTrainLoader:
    """ImageNet-like training data: random resized crop + flip at a resolution that can change
    between epochs (progressive resizing): call `set_resolution` before iterating."""

    def __init__(self, path: str | Path, resolution: int, options: LoaderOptions) -> None:
        _needs_beton(path, "the imagenet pipeline")
        keep_torch_threads()
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip

        self.decoder = RandomResizedCropRGBImageDecoder((resolution, resolution))
        self.loader = _loader(path, [self.decoder, RandomHorizontalFlip()], options)

    @property
    def resolution(self) -> int:
        return self.decoder.output_size[0]

    def set_resolution(self, resolution: int) -> None:
        self.decoder.output_size = (resolution, resolution)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def imagenet_val_loader(
    path: str | Path,
    options: LoaderOptions,
    resolution: int = 224,
    crop_ratio: float = DEFAULT_CROP_RATIO,
):
    """ImageNet-like validation data: the central `crop_ratio` of the shorter side, resized."""
    _needs_beton(path, "the imagenet pipeline")
    keep_torch_threads()
    from ffcv.fields.decoders import CenterCropRGBImageDecoder

    decoder = CenterCropRGBImageDecoder((resolution, resolution), ratio=crop_ratio)
    return _loader(path, [decoder], options)


def keep_torch_threads() -> None:
    """Stop FFCV from changing torch's intra-op thread count. FFCV sets it to 1 when first
    imported and to its worker count at every epoch, also from its batch-making thread: on a
    small machine that oversubscribes the cores the training step needs and changes CPU
    results behind the caller's back. Its decoders only need numba's threads, so its thread
    setter is narrowed to those. Call before anything imports ffcv."""
    threads = torch.get_num_threads()
    from ffcv.pipeline.compiler import Compiler  # importing it sets torch's threads to 1

    torch.set_num_threads(threads)
    if getattr(Compiler, "keeps_torch_threads", False):
        return

    def set_numba_threads(cls, n: int) -> None:
        import numba

        cls.num_threads = n if n >= 1 else (os.cpu_count() or 1)
        numba.set_num_threads(cls.num_threads)

    Compiler.set_num_threads = classmethod(set_numba_threads)
    Compiler.keeps_torch_threads = True


def _loader(path: str | Path, image_ops: list, options: LoaderOptions):
    keep_torch_threads()
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage
    from torchvision.transforms import Normalize

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no dataset file {path}; write one with data_prep/write_ffcv.py")
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


def _is_npz(path: str | Path) -> bool:
    return Path(path).suffix == ".npz"


def _needs_beton(path: str | Path, what: str) -> None:
    if _is_npz(path):
        raise UserError(f"{path}: {what} needs a .beton (FFCV); .npz files serve the cifar "
                        "pipeline only")


def dataset_labels(path: str | Path) -> np.ndarray:
    """Every label in a .beton (read from its metadata table, no image is decoded) or .npz."""
    if _is_npz(path):
        from fastibd.tensor_data import npz_labels

        return npz_labels(path)
    keep_torch_threads()
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no dataset file {path}; write one with data_prep/write_ffcv.py")
    try:
        reader = Reader(str(path))
    except Exception as err:  # noqa: BLE001 - FFCV raises assorted errors on foreign bytes
        raise UserError(f"{path} is not a readable .beton file ({err})") from None
    names = list(reader.handlers)
    if names != ["image", "label"]:
        raise UserError(f"{path} has fields {names}; expected image and label")
    return np.asarray(reader.metadata[f"f{names.index('label')}"])


def dataset_resolution(path: str | Path) -> int:
    """The side of the square images of a fixed-size .beton or .npz (the cifar pipeline's
    input)."""
    if _is_npz(path):
        from fastibd.tensor_data import npz_resolution

        return npz_resolution(path)
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


def set_epoch(loader, epoch: int) -> None:
    """Make the next pass over an FFCV loader (or a TensorLoader) use `epoch`'s shuffle (its
    order is seeded by seed + epoch), as DistributedSampler.set_epoch does; needed when a run
    resumes."""
    target = loader.loader if isinstance(loader, ImageNetTrainLoader) else loader
    target.next_epoch = epoch

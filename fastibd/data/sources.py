"""Image datasets as indexable `(uint8 HxWx3 image, int label)` samples.

These are the sources `data_prep/write_ffcv.py` turns into .beton files. Each returns
numpy images so FFCV's writer encodes them without another conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastibd.errors import UserError

SPLITS = ("train", "val")

DIGITS_RESOLUTION = 32
DIGITS_VAL_EVERY = 5  # sample i is a validation sample when i % 5 == 0


class ImageDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


class ArrayDataset:
    """Images already in memory: `images` is [N, H, W, 3] uint8, `labels` is [N] ints."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


class FolderDataset:
    """An ImageFolder split (`root/<class>/<image>`); images are decoded to RGB on access."""

    def __init__(self, root: Path) -> None:
        from torchvision.datasets import ImageFolder

        if not root.is_dir():
            raise UserError(f"folder {root} does not exist (expected {root}/<class>/<images>)")
        try:
            self.folder = ImageFolder(str(root))
        except FileNotFoundError as err:  # no class folders, or no images in them
            raise UserError(f"{root}: {err}") from None
        self.classes: list[str] = self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.folder.samples[index]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB")), label
        except UnidentifiedImageError:
            raise UserError(f"cannot read image {path}: not an image format PIL decodes") from None
        except (OSError, ValueError) as err:  # truncated or corrupt data
            raise UserError(f"cannot read image {path}: {err}") from None


def digits_dataset(split: str) -> ArrayDataset:
    """scikit-learn's 1797 real handwritten digits (8x8, bundled), as 32x32 RGB images.

    The split is fixed: sample i is validation when i % 5 == 0 (360 images), otherwise
    training (1437 images). Ink intensity 0..16 is scaled to 0..255 (bright digits on black),
    upsampled bilinearly and repeated over the three channels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    is_val = np.arange(len(digits.target)) % DIGITS_VAL_EVERY == 0
    keep = is_val if split == "val" else ~is_val
    size = (DIGITS_RESOLUTION, DIGITS_RESOLUTION)
    images = [
        np.asarray(Image.fromarray(_to_uint8(img)).resize(size, Image.BILINEAR))
        for img in digits.images[keep]
    ]
    rgb = np.repeat(np.stack(images)[..., None], 3, axis=-1)
    return ArrayDataset(np.ascontiguousarray(rgb), digits.target[keep])


def _to_uint8(digit: np.ndarray) -> np.ndarray:
    return np.round(digit * (255.0 / 16.0)).astype(np.uint8)


def cifar_dataset(name: str, data_dir: Path, split: str) -> ArrayDataset:
    """CIFAR-10/100 from torchvision's files in `data_dir`, downloaded there when missing."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        data = cls(str(data_dir), train=split == "train", download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        raise UserError(
            f"could not get {name} into {data_dir} ({err}); without network access, put "
            f"{archive} (or its extracted folder) in a directory and pass it as --data-dir, "
            "or use --dataset digits for the bundled offline data"
        ) from None
    return ArrayDataset(data.data, np.asarray(data.targets))


def folder_splits(root: Path) -> dict[str, FolderDataset]:
    """An ImageFolder tree `root/train/<class>/...` and `root/val/<class>/...`."""
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist (expected train/ and val/ inside)")
    splits = {split: FolderDataset(root / split) for split in SPLITS}
    if splits["train"].classes != splits["val"].classes:
        only_train = sorted(set(splits["train"].classes) - set(splits["val"].classes))
        only_val = sorted(set(splits["val"].classes) - set(splits["train"].classes))
        raise UserError(
            f"train/ and val/ in {root} have different class folders, so labels would not "
            f"agree (only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    return splits

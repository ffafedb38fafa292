"""Image datasets as indexable `(uint8 HxWx3 image, int label)` samples.

These are the sources `data_prep/write_ffcv.py` turns into .beton files. Each returns
numpy images so FFCV's writer encodes them without another conversion. Files a dataset's
host publishes are downloaded by fastibd.data.fetch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastibd.data.fetch import Remote, fetch, unavailable, unpack
from fastibd.errors import UserError, require_file

SPLITS = ("train", "val")
SVHN_SPLITS = {"train": "train", "val": "test"}  # our split -> torchvision's SVHN split
SVHN_LABELS = 10  # the .mat files label digit 0 as 10

TINY_IMAGENET = Remote("http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                       "tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de")
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"

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


class FileDataset:
    """Image files and their labels (`samples`: (path, label) pairs; `classes`: the name of
    each label); each image is decoded to RGB when it is read."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples = samples
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        return read_rgb(path), label


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 HxWx3 (greyscale and palette images converted)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise UserError(f"cannot read image {path}: not an image format PIL decodes") from None
    except (OSError, ValueError) as err:  # missing, truncated or corrupt
        raise UserError(f"cannot read image {path}: {err}") from None


class FolderDataset(FileDataset):
    """An ImageFolder split (`root/<class>/<image>`). Labels index `classes` by class name
    (default: this split's own class folders, sorted), so a validation split may hold a
    subset of the training classes and still get the training labels."""

    def __init__(self, root: Path, classes: list[str] | None = None) -> None:
        from torchvision.datasets import ImageFolder

        if not root.is_dir():
            raise UserError(f"folder {root} does not exist (expected {root}/<class>/<images>)")
        try:
            folder = ImageFolder(str(root))
        except FileNotFoundError as err:  # no class folders, or no images in them
            raise UserError(f"{root}: {err}") from None
        own = folder.classes  # its class folders, sorted: ImageFolder's labels index them
        classes = own if classes is None else classes
        unknown = [name for name in own if name not in classes]
        if unknown:
            raise UserError(f"class folder(s) {', '.join(unknown[:5])} in {root} are not among "
                            f"the {len(classes)} training classes, so they have no label "
                            "(labels go by class name)")
        label = {name: index for index, name in enumerate(classes)}
        super().__init__([(path, label[own[index]]) for path, index in folder.samples], classes)


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
        raise unavailable(name, data_dir, err, f"{archive} (or its extracted folder)") from None
    return ArrayDataset(data.data, np.asarray(data.targets))


def folder_splits(root: Path) -> dict[str, FolderDataset]:
    """An ImageFolder tree `root/train/<class>/...` and `root/val/<class>/...`; labels by
    class name, from train's sorted classes (val may hold a subset of them)."""
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist (expected train/ and val/ inside)")
    train = FolderDataset(root / "train")
    return {"train": train, "val": FolderDataset(root / "val", classes=train.classes)}


def svhn_dataset(data_dir: Path, split: str) -> ArrayDataset:
    """SVHN's cropped digits (32x32) from torchvision's files in `data_dir` (train: 73,257
    images from `train_32x32.mat`; val: 26,032 from `test_32x32.mat`), downloaded there when
    missing. Label 10 (digit 0) becomes 0, as torchvision's SVHN."""
    from torchvision.datasets import SVHN

    url, filename, md5 = SVHN.split_list[SVHN_SPLITS[split]]
    files = " and ".join(SVHN.split_list[SVHN_SPLITS[s]][1] for s in SPLITS)
    path = fetch(Remote(url, filename, md5), data_dir, "svhn", files)
    images, labels = read_svhn_mat(path)
    return ArrayDataset(images, labels)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images of an SVHN .mat file as [N, 32, 32, 3] uint8, and its labels 0..9."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(str(path), variable_names=("X", "y"))
    except (MatReadError, OSError, ValueError, NotImplementedError) as err:  # not MATLAB v5
        raise UserError(f"cannot read {path}: {err} (delete it to download it again)") from None
    images, labels = mat.get("X"), mat.get("y")
    if images is None or labels is None:
        raise UserError(f"{path} has no 'X' and 'y' arrays: not an SVHN .mat file")
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[2] != 3
            or labels.size != images.shape[3]):
        raise UserError(f"{path}: expected 'X' uint8 [H, W, 3, N] and 'y' [N, 1], got "
                        f"{images.dtype} {list(images.shape)} and {list(labels.shape)}")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() > SVHN_LABELS):
        raise UserError(f"{path} has labels outside 1..10 ({labels.min()}..{labels.max()})")
    images = np.ascontiguousarray(images.transpose(3, 0, 1, 2))  # [H, W, 3, N] -> [N, H, W, 3]
    return images, np.where(labels == SVHN_LABELS, 0, labels)


def tiny_imagenet_splits(data_dir: Path) -> dict[str, FileDataset]:
    """Tiny-ImageNet's 64x64 images in its own layout (`tiny-imagenet-200/` in `data_dir`,
    or `data_dir` itself): train from `train/<wnid>/images/`, 500 per class; val from
    `val/images/` with `val/val_annotations.txt`, 50 per class. Labels: positions in the
    sorted `wnids.txt`, which must name exactly the train folders, so they are also
    ImageFolder's labels for train/. When missing, `tiny-imagenet-200.zip` in `data_dir` is
    extracted (and first downloaded, when that is missing too)."""
    root = tiny_imagenet_root(data_dir)
    lines = (root / "wnids.txt").read_text().splitlines()
    wnids = sorted({line.strip() for line in lines if line.strip()})
    return {"train": FileDataset(_tiny_imagenet_train(root, wnids), wnids),
            "val": FileDataset(_tiny_imagenet_val(root, wnids), wnids)}


def tiny_imagenet_root(data_dir: Path) -> Path:
    """The folder holding `wnids.txt`, extracted (or downloaded and extracted) if need be."""
    folder = data_dir / TINY_IMAGENET_FOLDER
    for root in (data_dir, folder):
        if (root / "wnids.txt").is_file():
            return root
    if folder.exists():
        raise UserError(f"{folder} has no wnids.txt: not an extracted tiny-imagenet-200 "
                        "(delete it to extract the zip again)")
    files = f"{TINY_IMAGENET.filename} (or its extracted {TINY_IMAGENET_FOLDER}/)"
    return unpack(fetch(TINY_IMAGENET, data_dir, "tiny-imagenet", files), folder)


def _tiny_imagenet_train(root: Path, wnids: list[str]) -> list[tuple[str, int]]:
    train = root / "train"
    folders = {p.name for p in train.iterdir() if p.is_dir()} if train.is_dir() else set()
    if folders != set(wnids):
        missing, extra = sorted(set(wnids) - folders), sorted(folders - set(wnids))
        raise UserError(f"{train} does not match {root / 'wnids.txt'}: no folder for "
                        f"{missing[:5]}, folders not in wnids.txt {extra[:5]}")
    samples = []
    for label, wnid in enumerate(wnids):
        images = train / wnid / "images"
        files = sorted(p for p in images.iterdir() if _is_image(p)) if images.is_dir() else []
        if not files:
            raise UserError(f"no images in {images}")
        samples += [(str(p), label) for p in files]
    return samples


def _tiny_imagenet_val(root: Path, wnids: list[str]) -> list[tuple[str, int]]:
    listing = require_file(root / "val" / "val_annotations.txt", "Tiny-ImageNet val labels")
    label = {wnid: index for index, wnid in enumerate(wnids)}
    samples = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        fields = line.split()  # file, wnid, then the bounding box
        if not fields:
            continue
        if len(fields) < 2 or fields[1] not in label:
            raise UserError(f"{listing} line {number}: expected an image file and a wnid "
                            f"from wnids.txt, got {line.strip()!r}")
        path = root / "val" / "images" / fields[0]
        if not path.is_file():
            raise UserError(f"{listing} line {number}: no image {path}")
        samples.append((str(path), label[fields[1]]))
    if not samples:
        raise UserError(f"{listing} lists no images")
    return samples


def _is_image(path: Path) -> bool:
    from torchvision.datasets.folder import is_image_file

    return path.is_file() and is_image_file(path.name)

"""fastibd.data: what the training step receives from the FFCV loaders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import write_ffcv
from fastibd.data import ImageNetTrainLoader, LoaderOptions, imagenet_val_loader, make_loader
from fastibd.data.beton import image_field, write_beton
from fastibd.data.sources import ArrayDataset
from fastibd.errors import UserError
from tests.conftest import REPO, make_image_folder


def assert_training_batch(images: torch.Tensor, labels: torch.Tensor, size: int) -> None:
    assert images.shape == (len(labels), 3, size, size)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= images.min().item() and images.max().item() <= 1.0
    assert labels.dtype == torch.int64 and labels.shape == (len(images),)


@pytest.fixture(scope="module")
def indexed_beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """101 real 32x32 digit images whose label is their index: lets a test see every sample."""
    from fastibd.data.sources import digits_dataset

    images = digits_dataset("val").images[:101]
    path = tmp_path_factory.mktemp("indexed") / "indexed.beton"
    return write_beton(ArrayDataset(images, np.arange(len(images))), path, num_workers=2)


def test_cifar_train_epoch_sees_each_sample_once(indexed_beton: Path) -> None:
    options = LoaderOptions(batch_size=16, num_workers=2, seed=0)  # 101 = 6 * 16 + 5
    threads = torch.get_num_threads()
    loader = make_loader(indexed_beton, "cifar", "train", options)
    assert torch.get_num_threads() == threads  # FFCV would set it to num_workers
    for _epoch in range(2):
        seen = []
        for images, labels in loader:
            assert torch.get_num_threads() == threads  # ... and again at every epoch
            assert_training_batch(images, labels, 32)
            seen.append(labels.clone())  # FFCV reuses its buffers
        order = torch.cat(seen)
        assert sorted(order.tolist()) == list(range(101))
    assert order.tolist() != list(range(101))  # shuffled


def test_a_loader_made_first_in_a_process_keeps_torch_threads(indexed_beton: Path) -> None:
    """The first ffcv import sets torch's threads to 1: a loader built before anything else
    of FFCV's has run must still leave the caller's count (in a fresh process, since this one
    has imported ffcv already; the count during epochs is checked above)."""
    code = ("import sys, torch\n"
            "torch.set_num_threads(2)\n"
            "from fastibd.data import LoaderOptions, make_loader\n"
            "make_loader(sys.argv[1], 'cifar', 'train',\n"
            "            LoaderOptions(batch_size=16, num_workers=1))\n"
            "print(torch.get_num_threads())\n")
    result = subprocess.run([sys.executable, "-c", code, str(indexed_beton)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["2"]


def test_cifar_train_augments_and_val_does_not(digits_dir: Path) -> None:
    options = LoaderOptions(batch_size=360, num_workers=2, order="sequential")
    path = digits_dir / "val.beton"
    ((val_images, val_labels),) = [(x.clone(), y.clone())
                                   for x, y in make_loader(path, "cifar", "eval", options)]
    ((train_images, train_labels),) = [(x.clone(), y.clone())
                                       for x, y in make_loader(path, "cifar", "train",
                                                               options)]
    assert torch.equal(val_labels, train_labels)
    assert_training_batch(train_images, train_labels, 32)
    changed = (train_images != val_images).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # random 4 px translations and flips
    # Each training image is its stored image, maybe flipped, shifted by at most 4 px with
    # zero fill (= random crop of the 4 px zero-padded image).
    for train_image, val_image in zip(train_images[:20], val_images[:20], strict=True):
        assert any(torch.equal(train_image, candidate) for candidate in crops(val_image))


def crops(image: torch.Tensor, pad: int = 4):
    size = image.shape[-1]
    for source in (image, image.flip(-1)):
        padded = torch.nn.functional.pad(source, (pad, pad, pad, pad))
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                yield padded[:, dy:dy + size, dx:dx + size]


def test_imagenet_loaders_resize_between_epochs(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "src", sizes=[(40, 56), (48, 48), (60, 36)], per_class=5)
    out = tmp_path / "out"
    assert write_ffcv.main(["--dataset", "imagenet", "--data-dir", str(root), "--out-dir", str(out),
                            "--max-resolution", "50", "--num-workers", "2"]) == 0
    options = LoaderOptions(batch_size=4, num_workers=2, drop_last=False)
    train = ImageNetTrainLoader(out / "train.beton", resolution=16, options=options)
    for resolution in (16, 24):
        train.set_resolution(resolution)
        assert train.resolution == resolution
        count = 0
        for images, labels in train:
            assert_training_batch(images, labels, resolution)
            count += len(labels)
        assert count == 15 and len(train) == 4

    val = imagenet_val_loader(out / "val.beton", options, resolution=20, crop_ratio=0.875)
    labels = torch.cat([y.clone() for x, y in val if assert_training_batch(x, y, 20) is None])
    assert sorted(labels.tolist()) == sorted([0] * 5 + [1] * 5 + [2] * 5)


def test_loader_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no dataset file"):
        make_loader(tmp_path / "missing.beton", "cifar", "train",
                    LoaderOptions(batch_size=2))
    path = write_beton(ArrayDataset(np.zeros((3, 8, 8, 3), np.uint8), np.arange(3)),
                       tmp_path / "tiny.beton", image=image_field("raw"), num_workers=1)
    with pytest.raises(UserError, match="distributed"):
        options = LoaderOptions(batch_size=2, order="quasi_random", distributed=True)
        make_loader(path, "cifar", "train", options)
    with pytest.raises(UserError, match="order must be"):
        make_loader(path, "cifar", "train",
                    LoaderOptions(batch_size=2, order="shuffled"))  # type: ignore

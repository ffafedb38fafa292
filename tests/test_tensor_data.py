""".npz datasets (fastibd.data.tensor_loader): written by data_prep/write_ffcv.py --format npz,
served from device memory with the FFCV loaders' contract, and trained on without FFCV,
also as a one-process DDP run."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from data_prep import write_ffcv
from fastibd.data import LoaderOptions, dataset_labels, dataset_resolution, make_loader
from fastibd.data import sources as datasets
from fastibd.data import tensor_loader as tensor_data
from fastibd.data.tensor_loader import TensorLoader
from fastibd.distributed import shutdown
from fastibd.errors import UserError
from fastibd.train.settings import load_settings
from tests.conftest import make_image_folder


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits_npz")
    assert write_ffcv.main(["--dataset", "digits", "--format", "npz", "--out-dir", str(out)]) == 0
    return out


def test_npz_holds_exactly_the_dataset(digits_npz: Path) -> None:
    for split in datasets.SPLITS:
        source = datasets.digits_dataset(split)
        images, labels = tensor_data.read_npz(digits_npz / f"{split}.npz")
        np.testing.assert_array_equal(images, source.images)
        np.testing.assert_array_equal(labels, source.labels)
        np.testing.assert_array_equal(dataset_labels(digits_npz / f"{split}.npz"), labels)
    assert dataset_resolution(digits_npz / "train.npz") == 32


def test_sequential_batches_are_the_images_scaled_in_channels_last(digits_npz: Path) -> None:
    path = digits_npz / "val.npz"
    images, labels = tensor_data.read_npz(path)
    loader = make_loader(path, "cifar", "eval",
                         LoaderOptions(batch_size=100, order="sequential"))
    assert isinstance(loader, TensorLoader) and len(loader) == 4  # 360 = 3 * 100 + 60
    xs, ys = zip(*loader, strict=True)
    assert [len(y) for y in ys] == [100, 100, 100, 60]
    for x in xs:
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    torch.testing.assert_close(torch.cat(xs).double(), expected, rtol=0, atol=1e-7)
    assert torch.equal(torch.cat(ys), torch.from_numpy(labels))


def test_random_order_is_seeded_per_epoch_and_drop_last_drops(digits_npz: Path) -> None:
    options = LoaderOptions(batch_size=64, order="random", seed=3, drop_last=True,
                            indices=tuple(range(0, 1437, 7)))  # 206 samples
    labels = tensor_data.read_npz(digits_npz / "train.npz")[1][list(options.indices)]

    def epoch_labels(loader: TensorLoader) -> torch.Tensor:
        return torch.cat([y for _, y in loader])

    first, again = TensorLoader(digits_npz / "train.npz", options), \
        TensorLoader(digits_npz / "train.npz", options)
    assert len(first) == 3
    e0, e1 = epoch_labels(first), epoch_labels(first)
    assert len(e0) == 192 and not torch.equal(e0, e1)  # a new order each epoch
    assert torch.equal(epoch_labels(again), e0)  # same seed, same epoch: same order
    again.set_epoch(1)  # what a resumed run does
    assert torch.equal(epoch_labels(again), e1)
    assert set(e0.tolist()) <= set(labels.tolist())


def test_npz_and_beton_give_the_same_random_order(digits_npz: Path, digits_dir: Path) -> None:
    """The same seed draws the same batches from either file (the README's promise; the
    npz loader shuffled with torch.randperm, FFCV with numpy's permutation)."""
    options = LoaderOptions(batch_size=50, order="random", seed=11, num_workers=1,
                            indices=tuple(range(3, 360, 2)))
    loaders = [make_loader(digits_npz / "val.npz", "cifar", "eval", options),
               make_loader(digits_dir / "val.beton", "cifar", "eval", options)]
    for epoch in (0, 3):
        batches = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches.append([(x.clone(), y.clone()) for x, y in loader])
        (npz, beton) = batches
        assert len(npz) == len(beton) == 4
        for (x_npz, y_npz), (x_beton, y_beton) in zip(npz, beton, strict=True):
            assert torch.equal(y_npz.cpu(), y_beton.cpu())
            assert torch.equal(x_npz.cpu(), x_beton.cpu())


def test_distributed_ranks_split_every_sample_into_equal_shares(
        digits_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = LoaderOptions(batch_size=1000, order="random", seed=0, distributed=True,
                            indices=tuple(range(101)))
    monkeypatch.setattr(tensor_data.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(tensor_data.dist, "get_world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(tensor_data.dist, "get_rank", lambda rank=rank: rank)
        loader = TensorLoader(digits_npz / "val.npz", options)
        loader.images = torch.arange(101).view(101, 1, 1, 1).expand(101, 1, 1, 3).contiguous()
        ((x, _),) = list(loader)  # images replaced by their index, to see which were drawn
        shares.append(x[:, 0, 0, 0].mul(255).round().long())
    assert [len(s) for s in shares] == [51, 51]  # 101 padded to 102
    assert set(torch.cat(shares).tolist()) == set(range(101))


def test_train_augmentation_crops_and_flips_on_the_device(digits_npz: Path) -> None:
    path = digits_npz / "val.npz"
    options = LoaderOptions(batch_size=360, order="sequential", seed=0)
    (plain, _), = list(make_loader(path, "cifar", "eval", options))
    (augmented, _), = list(make_loader(path, "cifar", "train", options))
    assert augmented.shape == plain.shape
    assert augmented.is_contiguous(memory_format=torch.channels_last)
    changed = (augmented != plain).flatten(1).any(1).float().mean()
    assert changed > 0.5  # most images moved or flipped


@pytest.mark.parametrize(("arrays", "expected"), [
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "arrays images and labels"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.int64)},
     "uint8 [N, H, W, 3]"),
    ({"images": np.zeros((2, 4, 4, 3), np.float32), "labels": np.zeros(2, np.int64)},
     "uint8 [N, H, W, 3]"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, np.int64)},
     "labels must be 2 integers"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, -1])},
     "labels must be >= 0"),
])
def test_bad_npz_files_are_user_errors(arrays: dict, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        tensor_data.read_npz(path)


def test_not_an_npz_and_imagenet_pipeline_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="not a dataset .npz"):
        tensor_data.read_npz(path)
    from fastibd.data import ImageNetTrainLoader

    with pytest.raises(UserError, match="imagenet pipeline needs a .beton"):
        ImageNetTrainLoader(path, 64, LoaderOptions(batch_size=2))


def test_npz_refuses_images_of_several_sizes(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    make_image_folder(tmp_path / "src", sizes=[(20, 16), (24, 24)], per_class=2)
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "src"), "--format", "npz",
            "--out-dir", str(tmp_path / "out")]
    assert write_ffcv.main(argv) == 2
    assert "needs images of one size" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.npz"))  # nothing half-written


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_process_torchrun_environment_trains_with_ddp(
        digits_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `torchrun --nproc_per_node=1 -m fastibd.train` gives the trainer: a process group
    of one (gloo here, NCCL on a GPU), a DDP-wrapped objective, and npz data without FFCV."""
    from fastibd.train import Trainer

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    settings = load_settings([
        "--cfg", "smoke_teacher", "--training.epochs=1", "--training.max_steps=2",
        "--data.holdout=64", "--attack.steps=1", "--attack.eval_steps=1",
        "--logging.progress=false", f"--data.train_path={digits_npz / 'train.npz'}",
        f"--data.val_path={digits_npz / 'val.npz'}", f"--training.out_dir={tmp_path}"])
    trainer = Trainer(settings)
    try:
        assert trainer.world.distributed and trainer.world.size == 1
        assert isinstance(trainer.step.forward, DistributedDataParallel)
        assert isinstance(trainer.data.train.source, TensorLoader)  # under the crop and flip
        before = [p.detach().clone() for p in trainer.step.student.parameters()]
        assert trainer.fit() == 0
    finally:
        shutdown(trainer.world)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.step.student.parameters(),
                                                     strict=True))
    assert (tmp_path / "last.pt").is_file()


def test_evaluate_reads_npz(digits_npz: Path, tmp_path: Path) -> None:
    import json

    from fastibd.eval import evaluate
    from fastibd.models import build_model
    from fastibd.models.checkpoint import atomic_save, model_checkpoint

    torch.manual_seed(0)
    model = build_model("resnet18", 10, "none", 1 / 8).eval()
    ckpt = atomic_save(model_checkpoint(model), tmp_path / "m.pt")
    assert evaluate.main(["--ckpt", str(ckpt), "--data", str(digits_npz / "val.npz"),
                          "--attacks", "clean", "--n", "50", "--device", "cpu",
                          "--no-progress", "--out", str(tmp_path / "r.json")]) == 0
    images, labels = tensor_data.read_npz(digits_npz / "val.npz")
    x = torch.from_numpy(images[:50]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = (model(x).argmax(1) == torch.from_numpy(labels[:50])).float().mean().item()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["attacks"]["clean"]["accuracy"] == pytest.approx(expected)

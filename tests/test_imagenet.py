"""The ImageNet configs (Fast-IBD, eps 2/255 and 4/255) on a CPU: they parse, build the
ImageNet pipeline and ResNet-50s, and train a few steps at tiny resolution with DDP (gloo,
2 processes), progressively resized on schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import write_ffcv
from fastibd.data import resolution_at
from fastibd.distributed import process_count
from fastibd.models import build_model
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.models.imagenet_resnet import BlurConv2d
from fastibd.run_dir import read_metrics
from fastibd.train.settings import load_settings
from tests.conftest import cli_error, make_image_folder, train_cli

TINY = "1/16"


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of 3 classes x 12 images of assorted sizes, written as ImageNet is."""
    tmp = tmp_path_factory.mktemp("imagenet_like")
    root = make_image_folder(tmp / "src", sizes=[(40, 56), (48, 48), (60, 36)], per_class=12)
    out = tmp / "beton"
    assert write_ffcv.main(["--dataset", "imagenet", "--data-dir", str(root), "--out-dir",
                            str(out), "--max-resolution", "64", "--num-workers", "2"]) == 0
    return out


@pytest.mark.parametrize(("name", "eps"), [("imagenet_eps4", 4), ("imagenet_eps2", 2)])
def test_imagenet_configs_hold_the_recipe(name: str, eps: int) -> None:
    settings = load_settings(["--cfg", name]).as_dict()
    data, attack, optim = settings["data"], settings["attack"], settings["optim"]
    assert settings["model"]["arch"] == settings["teacher"]["arch"] == "resnet50"
    assert settings["loss"]["mode"] == "ibd" and settings["model"]["blurpool"]
    assert attack["eps"] == pytest.approx(eps / 255)
    assert attack["steps"] == 1 and attack["start"] == "uniform"  # FGSM-RS
    assert attack["fgsm_alpha"] == 1.25  # step 1.25 eps
    assert (data["pipeline"], data["min_res"], data["max_res"], data["val_res"]) == \
        ("imagenet", 160, 192, 256)
    assert data["val_crop_ratio"] == pytest.approx(224 / 256)
    assert optim["schedule"] == "onecycle" and optim["lr_scaling"]
    assert settings["training"]["nproc"] == "auto"
    schedule = [resolution_at(e, 160, 192, data["start_ramp"], data["end_ramp"])
                for e in range(settings["training"]["epochs"])]
    assert schedule[0] == 160 and schedule[-1] == 192 and schedule == sorted(schedule)


def ffcv_get_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int,
                        start_ramp: int) -> int:
    """A port of ffcv-imagenet's `ImageNetTrainer.get_resolution` (train_imagenet.py, commit
    4dd291a122096a2032ec9fd19633e1b9aff3577d, lines 173-185), written apart from fastibd's."""
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize("min_res,max_res,start_ramp,end_ramp", [
    (160, 192, 65, 76),  # rn50_88_epochs.yaml
    (160, 192, 11, 13),  # imagenet_eps4 / imagenet_eps2
    (160, 224, 0, 10), (128, 256, 3, 40), (160, 192, 5, 5), (160, 200, 2, 6), (192, 192, 1, 4)])
def test_progressive_resizing_follows_ffcv_imagenet(min_res: int, max_res: int, start_ramp: int,
                                                     end_ramp: int) -> None:
    """The schedule rounded down to a multiple of 32 before: epoch 12 of imagenet_eps4 ran at
    160 px where FFCV's recipe runs 192, and a max_res of 200 was never reached."""
    for epoch in range(end_ramp + 3):
        assert resolution_at(epoch, min_res, max_res, start_ramp, end_ramp) == \
            ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp), epoch


def test_missing_teacher_says_how_to_get_it(imagenet_like: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    from fastibd.train import main

    line = cli_error(main, ["--cfg", "imagenet_eps4",
                            f"--data.train_path={imagenet_like / 'train.beton'}",
                            f"--data.val_path={imagenet_like / 'val.beton'}", "--data.holdout=0",
                            "--training.device=cpu", f"--teacher.path={tmp_path / 'absent.ckpt'}",
                            f"--training.out_dir={tmp_path / 'run'}"], capsys)
    assert "absent.ckpt" in line and "robust-models-transfer" in line and "Salman2020Do_R50" in line


def test_process_count(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert process_count("auto", "cpu") == 1
    assert process_count("3", "cpu") == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert process_count("auto", "auto", lr_scaling=True) == 4  # the ImageNet recipes
    capsys.readouterr()
    # batch_size is per process: a recipe whose lr is for one process's batch stays in one
    assert process_count("auto", "auto", lr_scaling=False) == 1
    assert "4 GPUs" in capsys.readouterr().err
    assert process_count("2", "auto", lr_scaling=False) == 2
    assert process_count("auto", "cpu", lr_scaling=True) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under torchrun: never launch again
    assert process_count("3", "cpu") == 1


def test_blurpool_keeps_torchvision_names_and_only_changes_strided_convs() -> None:
    torch.manual_seed(0)
    plain = build_model("resnet50", 10, "imagenet", 1 / 4)
    blurred = build_model("resnet50", 10, "imagenet", 1 / 4, blurpool=True)
    blurred.load_state_dict(plain.state_dict())  # same keys, same shapes
    swapped = {name for name, m in blurred.named_modules() if isinstance(m, BlurConv2d)}
    strided = {name for name, m in plain.named_modules() if isinstance(m, torch.nn.Conv2d)
               and max(m.stride) > 1 and m.in_channels >= 16}
    assert swapped == strided and "conv1" not in swapped
    # A blurred constant image is the same constant away from the borders: the filter sums to 1.
    conv = blurred.get_submodule(sorted(swapped)[0])
    x = torch.ones(1, conv.in_channels, 8, 8)
    reference = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(conv(x)[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1])


def test_imagenet_config_trains_with_ddp_and_progressive_resizing(
        imagenet_like: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes share the two cores
    teacher = build_model("resnet50", 3, "imagenet", width_mult=1 / 16)
    atomic_save(model_checkpoint(teacher), tmp_path / "teacher.pt")
    run = tmp_path / "run"
    result = train_cli(
        "--cfg", "imagenet_eps4", f"--data.train_path={imagenet_like / 'train.beton'}",
        f"--data.val_path={imagenet_like / 'val.beton'}", "--data.holdout=0",
        "--data.batch_size=8", "--data.num_workers=1", "--data.min_res=16", "--data.max_res=24",
        "--data.start_ramp=0", "--data.end_ramp=1", "--data.res_step=8", "--data.val_res=24",
        f"--model.width_mult={TINY}", f"--teacher.width_mult={TINY}",
        f"--teacher.path={tmp_path / 'teacher.pt'}", "--loss.attention_dim=8",
        "--training.device=cpu", "--training.nproc=2", "--training.epochs=2",
        "--training.max_steps=2", "--logging.progress=false", f"--training.out_dir={run}",
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting 2 processes" in result.stdout
    epochs = [r for r in read_metrics(run) if r["kind"] == "epoch"]
    assert [r["resolution"] for r in epochs] == [16, 24]  # what the loader produced
    assert all(r["images"] == 2 * 2 * 8 for r in epochs)  # 2 ranks x 2 steps x 8 images
    assert all(r["loss_feat"] > 0 for r in epochs)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["spec"]["options"] == {"blurpool": True}
    assert state["spec"]["crop_ratio"] == pytest.approx(224 / 256)  # what evaluate will feed
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2  # each rank's streams


def test_evaluation_feeds_the_center_crop_the_run_evaluated_with(
        imagenet_like: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fastibd.evaluate always cropped 224/256, whatever data.val_crop_ratio the run had
    selected its checkpoint with."""
    import json
    from dataclasses import replace

    from fastibd.data import first_examples
    from fastibd.eval import evaluate

    val = imagenet_like / "val.beton"
    wide, usual = (next(iter(first_examples(val, "imagenet", 4, 4, torch.device("cpu"), 24, 1,
                                            ratio)))[0].clone() for ratio in (1.0, None))
    assert (wide - usual).abs().max() > 0.1  # the crop shows in the images
    model = build_model("resnet50", 3, "imagenet", width_mult=1 / 16)
    model.spec = replace(model.spec, resolution=24, crop_ratio=1.0)  # as a run records it
    ckpt = atomic_save(model_checkpoint(model), tmp_path / "m.pt")
    fed: list[float | None] = []

    def spy(*args, **kwargs):
        fed.append(args[7])
        return first_examples(*args, **kwargs)

    monkeypatch.setattr(evaluate, "first_examples", spy)
    for flags, ratio in (([], 1.0), (["--crop-ratio", "0.5"], 0.5)):
        out = tmp_path / f"{ratio}.json"
        assert evaluate.main(["--ckpt", str(ckpt), "--data", str(val), "--attacks", "clean",
                              "--n", "4", "--sanity-n", "0", "--device", "cpu", "--workers",
                              "1", "--no-progress", "--out", str(out), *flags]) == 0
        assert fed[-1] == ratio and json.loads(out.read_text())["data"]["crop_ratio"] == ratio

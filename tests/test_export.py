"""fastibd.export: a run's student as a RobustBench state_dict, and its model card.

The architectures below are written here, after RobustBench's own code (wide_resnet.py,
resnet.py, utils_architectures.normalize_model) and torchvision's ResNet-50, without any of
fastibd's models: an export is right when it loads into them strictly and gives the logits
the fastibd model gives.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch import nn

from fastibd.eval import evaluate, export
from fastibd.models import ARCHITECTURES, NORMALIZATIONS, TappedModel, build_model
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.models.cifar_resnet import CifarResNet
from fastibd.models.teachers import load_checkpoint
from fastibd.train.settings import load_settings
from tests.conftest import cli_error
from tests.test_teachers import randomized


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def width(channels: int, scale: float) -> int:
    return max(1, round(channels * scale))


def conv(in_planes: int, out_planes: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """RobustBench's convolutions: no bias, padding 1 for 3x3, 0 for 1x1."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=kernel_size, stride=stride,
                     padding=kernel_size // 2, bias=False)


# ------------------------------------------------- RobustBench's architectures, written again


class WideBasicBlock(nn.Module):
    """robustbench.model_zoo.architectures.wide_resnet.BasicBlock (dropRate 0)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = conv(in_planes, out_planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = conv(out_planes, out_planes, 3)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else conv(
            in_planes, out_planes, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return torch.add(x if self.equal_in_out else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, count: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes,
                                                    out_planes, stride if i == 0 else 1)
                                     for i in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """robustbench...wide_resnet.WideResNet, every width times `scale`."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, scale: float) -> None:
        super().__init__()
        channels = [width(c, scale) for c in (16, 16 * widen_factor, 32 * widen_factor,
                                              64 * widen_factor)]
        count = (depth - 4) // 6
        self.conv1 = conv(3, channels[0], 3)
        self.block1 = NetworkBlock(count, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(count, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(count, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)
        self.channels = channels[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


class BasicBlock(nn.Module):
    """robustbench...resnet.BasicBlock."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv(in_planes, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(conv(in_planes, planes, 1, stride),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return F.relu(out)


class PreActBlockV2(nn.Module):
    """robustbench...resnet.PreActBlockV2: the projection shortcut sees the activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv(in_planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(conv(in_planes, planes, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        out += shortcut
        return out


def stages(model: nn.Module, block: type[nn.Module], counts: list[int], scale: float) -> int:
    """layer1..layer4 as RobustBench's _make_layer builds them; the output width."""
    in_planes = width(64, scale)
    for index, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
        layers = []
        for i in range(count):
            stride = (1 if index == 0 else 2) if i == 0 else 1
            layers.append(block(in_planes, width(planes, scale), stride))
            in_planes = width(planes, scale)
        setattr(model, f"layer{index + 1}", nn.Sequential(*layers))
    return in_planes


class ResNet(nn.Module):
    """robustbench...resnet.ResNet(BasicBlock, counts)."""

    def __init__(self, counts: list[int], num_classes: int, scale: float) -> None:
        super().__init__()
        self.conv1 = conv(3, width(64, scale), 3)
        self.bn1 = nn.BatchNorm2d(width(64, scale))
        self.linear = nn.Linear(stages(self, BasicBlock, counts, scale), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).view(len(x), -1))


class PreActResNet(nn.Module):
    """robustbench...resnet.PreActResNet(PreActBlockV2, counts, bn_before_fc=True)."""

    def __init__(self, counts: list[int], num_classes: int, scale: float) -> None:
        super().__init__()
        self.conv1 = conv(3, width(64, scale), 3)
        out_planes = stages(self, PreActBlockV2, counts, scale)
        self.bn = nn.BatchNorm2d(out_planes)
        self.linear = nn.Linear(out_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.relu(self.bn(out))
        return self.linear(F.avg_pool2d(out, 4).view(len(x), -1))


class ImageNormalizer(nn.Module):
    """robustbench...utils_architectures.ImageNormalizer."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def normalize_model(model: nn.Module, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> nn.Module:
    """robustbench...utils_architectures.normalize_model."""
    return nn.Sequential(OrderedDict([("normalize", ImageNormalizer(mean, std)),
                                      ("model", model)]))


IMAGENET_STATS = NORMALIZATIONS["imagenet"]
# arch -> (width_mult, normalization, the independent model, input size)
CASES = {
    "wrn34_10": (1 / 8, "none", lambda: WideResNet(34, 10, 10, 1 / 8), 32),
    "preact_resnet18": (1 / 8, "none", lambda: PreActResNet([2, 2, 2, 2], 10, 1 / 8), 32),
    "resnet18": (1 / 8, "none", lambda: ResNet([2, 2, 2, 2], 10, 1 / 8), 32),
    "resnet34": (1 / 8, "none", lambda: ResNet([3, 4, 6, 3], 10, 1 / 8), 32),
    # ImageNet ResNets at full width: torchvision's own classes, in RobustBench's wrapper
    "resnet18_imagenet": (1.0, "imagenet", lambda: normalize_model(torchvision.models.resnet18(
        num_classes=10), *IMAGENET_STATS), 64),
    "resnet50": (1.0, "imagenet", lambda: normalize_model(torchvision.models.resnet50(
        num_classes=10), *IMAGENET_STATS), 64),
}
IMAGENET = ("resnet18_imagenet", "resnet50")


# ----------------------------------------------------------------------------- a fake run


def student(arch: str, width_mult: float, normalization: str, seed: int = 0,
            **options) -> TappedModel:
    torch.manual_seed(seed)
    return randomized(build_model(arch, 10, normalization, width_mult, **options), seed)


def make_run(run: Path, model: TappedModel, *overrides: str, metrics: list[dict] | None = None,
             best: bool = True) -> Path:
    """A run directory as fastibd.train leaves it: config.yaml of the smoke recipe (with
    `overrides`), best.pt (or only last.pt) and metrics.jsonl."""
    spec = model.spec
    settings = load_settings(["--cfg", "smoke", f"--model.arch={spec.arch}",
                              f"--model.width_mult={spec.width_mult}",
                              f"--model.normalization={spec.normalization}", *overrides])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(settings.as_dict(), sort_keys=False))
    name = "best.pt" if best else "last.pt"
    atomic_save(model_checkpoint(model, epoch=2, holdout={"clean_acc": 0.5, "pgd_acc": 0.25}),
                run / name)
    if metrics is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return run


def exported(run: Path, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    assert export.main([str(run), "--robustbench", str(out), *flags]) == 0
    return torch.load(out, map_location="cpu", weights_only=True)


def same_logits(model: nn.Module, reference: nn.Module, size: int) -> None:
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine, theirs = model.eval()(x), reference.eval()(x)
    assert mine.abs().max() > 0.1  # logits that tell the networks apart
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the weights


@pytest.mark.parametrize("arch", sorted(CASES))
def test_the_export_loads_strictly_into_an_independent_definition(arch: str,
                                                                  tmp_path: Path) -> None:
    width_mult, normalization, independent, size = CASES[arch]
    model = student(arch, width_mult, normalization)
    state = exported(make_run(tmp_path / "run", model), tmp_path / "out" / "model.pt")
    reference = independent()
    reference.load_state_dict(state, strict=True)
    same_logits(model, reference, size)
    # fastibd reads what it writes (the RobustBench naming teachers.py strips)
    again = load_checkpoint(arch, tmp_path / "out" / "model.pt", width_mult=width_mult).model
    same_logits(model, again, size)
    card = json.loads((tmp_path / "out" / "model.model_card.json").read_text())
    assert card["export"]["layout"] == ("normalize_model" if arch in IMAGENET else "plain")
    assert card["export"]["exact_counterpart"] == (width_mult == 1)


def test_the_imagenet_export_is_robustbench_s_wrapper_layout(tmp_path: Path) -> None:
    model = student("resnet18_imagenet", 1 / 8, "imagenet")
    state = exported(make_run(tmp_path / "run", model), tmp_path / "model.pt")
    assert list(state)[:2] == ["normalize.mean", "normalize.std"]
    assert all(key.startswith("model.") for key in list(state)[2:])
    torch.testing.assert_close(state["normalize.std"].flatten(),
                               torch.tensor(IMAGENET_STATS[1]))
    card = json.loads((tmp_path / "model.model_card.json").read_text())
    code = card["export"]["loading_code"]
    assert "from torchvision.models import resnet18" in code
    assert "normalize_model(resnet18(num_classes=10), (0.485, 0.456, 0.406)" in code


def test_a_normalized_cifar_student_is_refused_unless_wrapped(tmp_path: Path,
                                                               capsys) -> None:
    model = student("preact_resnet18", 1 / 8, "cifar10")
    run, out = make_run(tmp_path / "run", model), tmp_path / "model.pt"
    line = cli_error(export.main, [str(run), "--robustbench", str(out)], capsys)
    assert "normalizes its input (cifar10)" in line and "--wrap-normalization" in line
    assert not out.exists() and not (tmp_path / "model.MODEL_CARD.md").exists()

    state = exported(run, out, "--wrap-normalization")
    reference = normalize_model(PreActResNet([2, 2, 2, 2], 10, 1 / 8), (0.0,) * 3, (1.0,) * 3)
    reference.load_state_dict(state, strict=True)  # the file's statistics replace these
    same_logits(model, reference, 32)
    torch.testing.assert_close(reference.normalize.mean.flatten(),
                               torch.tensor(NORMALIZATIONS["cifar10"][0]))


# ----------------------------------------------------------------------------- refusals


def toy_net(**options) -> TappedModel:
    return CifarResNet(blocks=(1, 1, 1, 1), **options)


@pytest.mark.parametrize("case", ["unknown_arch", "blurpool", "resolution"])
def test_a_network_without_a_robustbench_counterpart_is_one_line(
        case: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    if case == "unknown_arch":  # an architecture fastibd may gain, with no counterpart
        monkeypatch.setitem(ARCHITECTURES, "toy_net", (toy_net, 32))
        model, needle = student("toy_net", 1 / 8, "none"), "toy_net, which has no RobustBench"
    elif case == "blurpool":  # the ImageNet recipe's student: torchvision does not blur
        model, needle = student("resnet50", 1 / 16, "imagenet", blurpool=True), "blurpool=true"
    else:
        model, needle = student("resnet18", 1 / 8, "none"), "trained at 48 px"
        model.spec = replace(model.spec, resolution=48)
    run = make_run(tmp_path / "run", model)
    line = cli_error(export.main, [str(run), "--robustbench", str(tmp_path / "m.pt")], capsys)
    assert needle in line, line
    assert not (tmp_path / "m.pt").exists()


def test_bad_runs_and_outputs_are_one_line(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run", student("resnet18", 1 / 8, "none"))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "no run directory": [str(tmp_path / "missing"), "--robustbench", "m.pt"],
        "has no best.pt or last.pt": [str(empty), "--robustbench", str(tmp_path / "m.pt")],
        "the run's own checkpoint": [str(run), "--robustbench", str(run / "best.pt")],
        "name the file .pt": [str(run), "--robustbench", str(tmp_path / "m.json")],
        "required: --robustbench": [str(run)],
        "no evaluation report": [str(run), "--robustbench", str(tmp_path / "m.pt"),
                                 "--report", str(tmp_path / "nope.json")],
    }
    for needle, argv in cases.items():
        assert needle in cli_error(export.main, argv, capsys)
    pth = tmp_path / "m.pth"  # README: an output name that is not .pt is refused
    assert cli_error(export.main, [str(run), "--robustbench", str(pth)], capsys) == (
        f"fastibd.export: error: --robustbench {pth}: name the file .pt (RobustBench's model "
        "files are)")
    assert not pth.exists()
    (run / "config.yaml").unlink()
    assert "no config.yaml" in cli_error(export.main, [str(run), "--robustbench",
                                                       str(tmp_path / "m.pt")], capsys)
    assert not (tmp_path / "m.pt").exists()


# ----------------------------------------------------------------------------- the card


EPOCHS = [{"kind": "epoch", "epoch": 1, "images_per_s": 100.0, "epoch_time_s": 12.0},
          {"kind": "epoch", "epoch": 2, "images_per_s": 300.0, "epoch_time_s": 4.0},
          {"kind": "final", "epoch": 2, "val_clean_acc": 0.5}]


@pytest.fixture(scope="module")
def evaluated_run(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, Path, Path]:
    """A tiny IBD run (its teacher a file of its own) with best.pt and a different last.pt,
    and the evaluator's report on best.pt: (run, report, teacher)."""
    root = tmp_path_factory.mktemp("evaluated")
    teacher = root / "teacher.pt"
    atomic_save(model_checkpoint(student("resnet18", 1 / 8, "none", seed=3)), teacher)
    run = make_run(root / "run", student("resnet18", 1 / 8, "none"),
                   f"--teacher.path={teacher}", "--training.epochs=2",
                   f"--data.train_path={digits_dir / 'train.beton'}",
                   f"--data.val_path={digits_dir / 'val.beton'}", metrics=EPOCHS)
    atomic_save(model_checkpoint(student("resnet18", 1 / 8, "none", seed=1)), run / "last.pt")
    report = root / "report.json"
    assert evaluate.main(["--ckpt", str(run / "best.pt"), "--data", str(digits_dir / "val.beton"),
                          "--attacks", "clean,pgd2", "--n", "20", "--no-progress",
                          "--out", str(report)]) == 0
    return run, report, teacher


def test_the_model_card_holds_the_evaluator_s_numbers(evaluated_run, tmp_path: Path,
                                                       digits_dir: Path) -> None:
    run, report_path, teacher = evaluated_run
    exported(run, tmp_path / "model.pt", "--report", str(report_path))
    report = json.loads(report_path.read_text())
    card = json.loads((tmp_path / "model.model_card.json").read_text())
    markdown = (tmp_path / "model.MODEL_CARD.md").read_text()

    evaluation = card["evaluation"]
    for name in ("clean", "pgd2"):
        assert evaluation["attacks"][name]["accuracy"] == report["attacks"][name]["accuracy"]
        assert evaluation["attacks"][name]["n"] == 20
        row = report["attacks"][name]
        assert f"| {name} | {100 * row['accuracy']:.2f}% | {row['correct']} / 20 |" in markdown
    assert evaluation["headline"]["pgd"] == {"attack": "pgd2",
                                             "accuracy": report["attacks"]["pgd2"]["accuracy"]}
    assert evaluation["headline"]["aa"] == "not run"
    assert evaluation["checkpoint"]["sha256"] == card["source"]["sha256"] == \
        file_sha256(run / "best.pt")
    assert card["source"]["checkpoint"] == str(run / "best.pt")
    assert evaluation["num_examples"] == 20 and evaluation["eps_255"] == "8/255"

    recipe = card["recipe"]
    assert (recipe["mode"], recipe["arch"], recipe["epochs"], recipe["seed"]) == \
        ("ibd", "resnet18", 2, 0)
    assert recipe["train_path"] == str(digits_dir / "train.beton")
    assert recipe["eps_255"] == "8/255"
    assert card["teacher"]["sha256"] == file_sha256(teacher)
    assert card["teacher"]["catalog_name"] is None
    assert file_sha256(teacher) in markdown

    hardware = card["hardware"]
    assert hardware["images_per_s"] == {"mean": 200.0, "min": 100.0, "max": 300.0, "epochs": 2}
    assert hardware["seconds_per_epoch"]["mean"] == 8.0 and hardware["training_seconds"] == 16.0
    assert hardware["device"] == "not recorded"  # training.device=auto, no device in metrics
    assert card["export"]["sha256"] == file_sha256(tmp_path / "model.pt")


def test_a_report_of_another_checkpoint_is_refused(evaluated_run, digits_dir: Path,
                                                   tmp_path: Path, capsys) -> None:
    run, _, _ = evaluated_run
    report = tmp_path / "last.json"  # the easy mistake: evaluating last.pt, exporting best.pt
    assert evaluate.main(["--ckpt", str(run / "last.pt"), "--data", str(digits_dir / "val.beton"),
                          "--attacks", "clean", "--n", "10", "--sanity-n", "0", "--no-progress",
                          "--out", str(report)]) == 0
    capsys.readouterr()
    line = cli_error(export.main, [str(run), "--robustbench", str(tmp_path / "m.pt"),
                                   "--report", str(report)], capsys)
    assert "last.pt" in line and f"not the exported {run / 'best.pt'}" in line
    assert not (tmp_path / "m.pt").exists()


def test_without_best_report_or_metrics_the_card_says_what_is_missing(tmp_path: Path,
                                                                      capsys) -> None:
    run = make_run(tmp_path / "run", student("resnet18", 1 / 8, "none"), "--loss.mode=pgd_at",
                   "--training.device=cpu", best=False)
    exported(run, tmp_path / "model.pt")
    assert "no --report" in capsys.readouterr().err
    card = json.loads((tmp_path / "model.model_card.json").read_text())
    assert card["source"]["checkpoint"] == str(run / "last.pt")
    assert "no best.pt" in card["source"]["why"]
    assert card["evaluation"] == "not evaluated: no --report given"
    assert card["teacher"] is None  # pgd_at trains without one
    hardware = card["hardware"]
    assert (hardware["device"], hardware["device_source"]) == ("cpu",
                                                               "config.yaml training.device")
    assert hardware["images_per_s"] == hardware["training_seconds"] == "not recorded"
    markdown = (tmp_path / "model.MODEL_CARD.md").read_text()
    assert "none (mode pgd_at trains without one)" in markdown
    assert "not evaluated" in markdown


def test_two_exports_in_one_folder_keep_their_own_cards(tmp_path: Path, capsys) -> None:
    """RobustBench's zoo keeps many models in one folder: a second export there must not
    overwrite the first one's card (both were MODEL_CARD.md before)."""
    runs = {name: make_run(tmp_path / name, student("resnet18", 1 / 8, "none"),
                           f"--loss.mode={mode}", "--training.device=cpu")
            for name, mode in (("at", "pgd_at"), ("trades", "trades"))}
    for name, run in runs.items():
        exported(run, tmp_path / "zoo" / f"{name}.pt")
    assert str(tmp_path / "zoo" / "trades.model_card.json") in capsys.readouterr().out
    for name, run in runs.items():
        card = json.loads((tmp_path / "zoo" / f"{name}.model_card.json").read_text())
        assert card["source"]["run_dir"] == str(run)
        assert card["export"]["path"] == str(tmp_path / "zoo" / f"{name}.pt")
        assert str(run) in (tmp_path / "zoo" / f"{name}.MODEL_CARD.md").read_text()
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == [
        "at.MODEL_CARD.md", "at.model_card.json", "at.pt",
        "trades.MODEL_CARD.md", "trades.model_card.json", "trades.pt"]


def test_the_recipe_writes_an_l2_budget_as_a_radius() -> None:
    """An L2 run's card says its radius, not a Linf-style x/255 ("128/255" for 0.5 was
    the card's text before)."""
    l2 = export.recipe_card({"attack": {"eps": 0.5, "norm": "l2"}})
    linf = export.recipe_card({"attack": {"eps": 8 / 255}})
    assert (l2["eps_255"], l2["norm"]) == ("0.5", "l2")
    assert (linf["eps_255"], linf["norm"]) == ("8/255", "linf")

"""fastibd.models: tap shapes as docs/method.md lists them, layout, and logits."""

from __future__ import annotations

import runpy
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from fastibd.errors import UserError
from fastibd.models import ARCHITECTURES, WIDE_RESNETS, build_model
from fastibd.models.teachers import load_teacher
from tests.test_teachers import PYAUTOATTACK, randomized


def stages(*groups: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """[(count, channels, size), ...] -> the tap shapes [(C, H, W), ...]."""
    return [(c, s, s) for count, c, s in groups for _ in range(count)]


# Full-size tap shapes (docs/method.md) (CIFAR at 32 px, ImageNet at 224 px).
FULL_SHAPES = {
    "resnet18": stages((2, 64, 32), (2, 128, 16), (2, 256, 8), (2, 512, 4)),
    "resnet34": stages((3, 64, 32), (4, 128, 16), (6, 256, 8), (3, 512, 4)),
    "preact_resnet18": stages((2, 64, 32), (2, 128, 16), (2, 256, 8), (2, 512, 4)),
    "wrn34_10": stages((5, 160, 32), (5, 320, 16), (5, 640, 8)),
    "wrn28_10": stages((4, 160, 32), (4, 320, 16), (4, 640, 8)),
    "wrn34_20": stages((5, 320, 32), (5, 640, 16), (5, 1280, 8)),
    "wrn76_10": stages((12, 160, 32), (12, 320, 16), (12, 640, 8)),  # (76 - 4) / 6 = 12
    "resnet18_imagenet": stages((2, 64, 56), (2, 128, 28), (2, 256, 14), (2, 512, 7)),
    "resnet50": stages((3, 256, 56), (4, 512, 28), (6, 1024, 14), (3, 2048, 7)),
}
# Tiny widths; no layer narrower than 2 channels (with C=1, channels_last is ambiguous).
TINY = {"resnet18": 1 / 8, "resnet34": 1 / 8, "preact_resnet18": 1 / 8, "wrn34_10": 1 / 10,
        "wrn28_10": 1 / 10, "wrn34_20": 1 / 10, "wrn76_10": 1 / 10, "resnet18_imagenet": 1 / 8,
        "resnet50": 1 / 16}


def test_every_architecture_is_covered() -> None:
    assert set(FULL_SHAPES) == set(ARCHITECTURES) == set(TINY)


@pytest.mark.parametrize("arch", sorted(FULL_SHAPES))
def test_full_size_tap_shapes_match_design(arch: str) -> None:
    with torch.device("meta"):  # full width without the memory (WRN-76-10: 114M parameters)
        model = build_model(arch, num_classes=10, normalization="none")
    assert model.feature_shapes(ARCHITECTURES[arch][1]) == FULL_SHAPES[arch]


@pytest.mark.parametrize("arch", sorted(FULL_SHAPES))
def test_tiny_models_taps_logits_and_layout(arch: str) -> None:
    torch.manual_seed(0)
    size = ARCHITECTURES[arch][1]  # 32 or 224: tiny widths keep even 224 px cheap
    model = build_model(arch, num_classes=7, normalization="cifar10", width_mult=TINY[arch])
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.rand(2, 3, size, size).to(memory_format=torch.channels_last)

    logits, taps = model(x, features=True)
    assert logits.shape == (2, 7)
    assert torch.equal(logits, model(x))
    full = FULL_SHAPES[arch]
    assert len(taps) == len(full)
    for tap, (channels, h, w) in zip(taps, full, strict=True):
        assert tap.shape[2:] == (h, w)
        assert tap.shape[1] == max(1, round(channels * TINY[arch]))
        assert tap.is_contiguous(memory_format=torch.channels_last)
    assert model.feature_shapes(size) == [tuple(t.shape[1:]) for t in taps]


def test_taps_are_the_network_tensors_not_copies() -> None:
    model = build_model("preact_resnet18", width_mult=1 / 8).eval()
    seen: list[torch.Tensor] = []
    # A pre-activation tap is the next block's activated input: what its conv1 reads.
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            block.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _, taps = model(torch.rand(2, 3, 32, 32), features=True)
    assert [t.data_ptr() for t in taps[:-1]] == [t.data_ptr() for t in seen[1:]]

    model = build_model("resnet50", width_mult=1 / 16).eval()
    outputs: list[torch.Tensor] = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            block.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    _, taps = model(torch.rand(2, 3, 64, 64), features=True)
    assert all(t is o for t, o in zip(taps, outputs, strict=True))


def test_normalization_is_inside_the_model() -> None:
    torch.manual_seed(0)
    plain = build_model("resnet18", normalization="none", width_mult=1 / 8).eval()
    normed = build_model("resnet18", normalization="cifar10", width_mult=1 / 8).eval()
    normed.load_state_dict(plain.state_dict())  # buffers for mean/std are not in state_dicts
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(normed(x), plain((x - mean) / std))
    assert not torch.allclose(normed(x), plain(x))


def test_bad_names_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown architecture"):
        build_model("resnet19")
    with pytest.raises(UserError, match="unknown normalization"):
        build_model("resnet18", normalization="mnist")
    with pytest.raises(UserError, match="sub_block1"):
        build_model("resnet18", sub_block1=True)


# WRN-34-10 and WRN-28-10 as the TRADES / RobustBench models report them; WRN-76-10 by hand.
KNOWN_PARAMETERS = {"wrn34_10": 46_160_474, "wrn28_10": 36_479_194, "wrn76_10": 113_929_434}


def wide_resnet_parameters(depth: int, k: int, classes: int = 10) -> int:
    """Parameters of a WRN-depth-k counted from its definition (Zagoruyko & Komodakis): each
    block is BN, 3x3 conv, BN, 3x3 conv, and a 1x1 projection where the width changes."""
    count, widths = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
    total = 3 * 16 * 9 + 2 * widths[3] + widths[3] * classes + classes  # stem, final BN, fc
    for c_in, c_out in pairwise(widths):
        total += 2 * c_in + 9 * c_in * c_out + c_in * c_out  # first block's BN, conv, shortcut
        total += (2 * count - 1) * (2 * c_out + 9 * c_out * c_out)  # every other BN + conv
    return total


@pytest.mark.parametrize("arch", sorted(WIDE_RESNETS))
def test_wide_resnet_parameter_counts(arch: str) -> None:
    with torch.device("meta"):
        model = build_model(arch, num_classes=10, normalization="none")
    count = sum(p.numel() for p in model.parameters())
    assert count == wide_resnet_parameters(*WIDE_RESNETS[arch])
    if arch in KNOWN_PARAMETERS:
        assert count == KNOWN_PARAMETERS[arch]


def test_resnet34_loads_the_cifar_reference_code_strictly(tmp_path: Path) -> None:
    """The CIFAR ResNet-34 of the code RSLAD/IBD/pyautoattack share, saved as RobustBench
    files are ('state_dict' wrapper, `model.` prefix): loads strictly, the same logits."""
    torch.manual_seed(0)
    reference = randomized(runpy.run_path(str(PYAUTOATTACK / "resnet.py"))["ResNet34"]())
    state = {"model." + k: v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "resnet34.pt")
    teacher = load_teacher("resnet34", tmp_path / "resnet34.pt")
    assert teacher.spec.arch == "resnet34" and teacher.spec.normalization == "none"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x), rtol=1e-5, atol=1e-5)


def test_wrn76_10_loads_a_robustbench_file_with_sub_block1(tmp_path: Path) -> None:
    """RobustBench's (TRADES) WideResNet names: blockN.layer.i.*, convShortcut, bn1, fc and the
    unused sub_block1, detected from the file as for wrn34_10."""
    torch.manual_seed(0)
    model = randomized(build_model("wrn76_10", 10, "none", width_mult=1 / 10, sub_block1=True))
    state = model.state_dict()
    for key in ("block1.layer.0.convShortcut.weight", "block3.layer.11.conv2.weight",
                "sub_block1.layer.11.bn2.running_var", "bn1.weight", "fc.bias"):
        assert key in state
    assert not any(k.startswith("block3.layer.12.") for k in state)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}},
               tmp_path / "wrn76_10.pt")
    teacher = load_teacher("wrn76_10", tmp_path / "wrn76_10.pt", width_mult=1 / 10)
    assert teacher.spec.options == {"sub_block1": True}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=1e-5, atol=1e-5)

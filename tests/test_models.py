"""fastibd.models: tap shapes as docs/method.md lists them, layout, and logits."""

from __future__ import annotations

import pytest
import torch

from fastibd.errors import UserError
from fastibd.models import ARCHITECTURES, build_model


def stages(*groups: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """[(count, channels, size), ...] -> the tap shapes [(C, H, W), ...]."""
    return [(c, s, s) for count, c, s in groups for _ in range(count)]


# Full-size tap shapes (docs/method.md) (CIFAR at 32 px, ImageNet at 224 px).
FULL_SHAPES = {
    "resnet18": stages((2, 64, 32), (2, 128, 16), (2, 256, 8), (2, 512, 4)),
    "preact_resnet18": stages((2, 64, 32), (2, 128, 16), (2, 256, 8), (2, 512, 4)),
    "wrn34_10": stages((5, 160, 32), (5, 320, 16), (5, 640, 8)),
    "wrn28_10": stages((4, 160, 32), (4, 320, 16), (4, 640, 8)),
    "wrn34_20": stages((5, 320, 32), (5, 640, 16), (5, 1280, 8)),
    "resnet18_imagenet": stages((2, 64, 56), (2, 128, 28), (2, 256, 14), (2, 512, 7)),
    "resnet50": stages((3, 256, 56), (4, 512, 28), (6, 1024, 14), (3, 2048, 7)),
}
# Tiny widths; no layer narrower than 2 channels (with C=1, channels_last is ambiguous).
TINY = {"resnet18": 1 / 8, "preact_resnet18": 1 / 8, "wrn34_10": 1 / 10, "wrn28_10": 1 / 10,
        "wrn34_20": 1 / 10, "resnet18_imagenet": 1 / 8, "resnet50": 1 / 16}


def test_every_architecture_is_covered() -> None:
    assert set(FULL_SHAPES) == set(ARCHITECTURES) == set(TINY)


@pytest.mark.parametrize("arch", sorted(FULL_SHAPES))
def test_full_size_tap_shapes_match_design(arch: str) -> None:
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

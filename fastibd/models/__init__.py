"""Architectures with feature taps and input normalization inside; build them by name.

    model = build_model("resnet18", num_classes=10, normalization="cifar10")
    logits = model(x)                          # x: [B, 3, H, W] in [0, 1]
    logits, taps = model(x, features=True)     # one tap per residual block
    model.feature_shapes(32)                   # [(C, H, W), ...] without computing
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from torchvision.models.resnet import BasicBlock, Bottleneck

from fastibd.config import Flag, Number, Text, option, section
from fastibd.errors import UserError
from fastibd.models.base import NORMALIZATIONS, ModelSpec, Stats, TappedModel
from fastibd.models.cifar_resnet import RESNET34_BLOCKS, CifarResNet, PreActResNet
from fastibd.models.imagenet_resnet import ImageNetResNet
from fastibd.models.wide_resnet import WideResNet

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "WIDE_RESNETS", "ModelSettings", "ModelSpec",
           "TappedModel", "build_model", "build_student", "conventional_resolution",
           "default_pipeline", "is_imagenet_arch"]

# name -> (depth, widen factor). One list, because loading a checkpoint needs to know which
# architectures are WideResNets: their TRADES / AWP files carry the unused `sub_block1`.
WIDE_RESNETS: dict[str, tuple[int, int]] = {
    "wrn34_10": (34, 10), "wrn28_10": (28, 10), "wrn34_20": (34, 20), "wrn76_10": (76, 10),
}


def _wide_resnet(depth: int, widen_factor: int) -> Callable[..., TappedModel]:
    # A closure, not functools.partial: an option may not silently change the depth.
    return lambda **kw: WideResNet(depth=depth, widen_factor=widen_factor, **kw)


# name -> (constructor taking num_classes, normalization, width_mult, **options; input size)
ARCHITECTURES: dict[str, tuple[Callable[..., TappedModel], int]] = {
    "resnet18": (CifarResNet, 32),
    "resnet34": (lambda **kw: CifarResNet(blocks=RESNET34_BLOCKS, **kw), 32),
    "preact_resnet18": (PreActResNet, 32),
    **{name: (_wide_resnet(*shape), 32) for name, shape in WIDE_RESNETS.items()},
    "resnet18_imagenet": (lambda **kw: ImageNetResNet(BasicBlock, (2, 2, 2, 2), **kw), 224),
    "resnet50": (lambda **kw: ImageNetResNet(Bottleneck, (3, 4, 6, 3), **kw), 224),
}


def build_model(arch: str, num_classes: int = 10, normalization: str | Stats = "cifar10",
                width_mult: float = 1.0, **options: Any) -> TappedModel:
    """Build an architecture by name. `width_mult` scales every channel count (tests use
    e.g. 1/8); `options` are architecture-specific (`sub_block1=True` for WideResNets that
    load TRADES/AWP checkpoints)."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if num_classes < 1 or width_mult <= 0:
        raise UserError(f"num_classes must be >= 1 and width_mult > 0, got {num_classes}, "
                        f"{width_mult}")
    constructor, _ = ARCHITECTURES[arch]
    try:
        model = constructor(num_classes=num_classes, normalization=normalization,
                            width_mult=width_mult, **options)
    except TypeError as err:  # an option this architecture does not have
        raise UserError(f"{arch}: {err}") from None
    model.spec = ModelSpec(arch, num_classes, normalization, width_mult, dict(options))
    return model


def is_imagenet_arch(arch: str) -> bool:
    """Whether `arch` is made for ImageNet-sized inputs (the imagenet data pipeline and
    normalization are its defaults)."""
    return conventional_resolution(arch) >= 128


def default_pipeline(arch: str) -> str:
    """The data pipeline (fastibd.data.PIPELINES) that feeds `arch` unless told otherwise."""
    return "imagenet" if is_imagenet_arch(arch) else "cifar"


@section("model", "The student")
class ModelSettings:
    arch: str = option(Text(), "architecture: " + ", ".join(ARCHITECTURES), "resnet18")
    width_mult: float = option(Number(0.001, 64), "channel multiplier", 1.0)
    normalization: str = option(Text(), "input normalization inside the model: cifar10, "
                                "cifar100, imagenet or none", "cifar10")
    blurpool: bool = option(Flag(), "ImageNet ResNets: blur before each strided convolution "
                            "(anti-aliasing, as FFCV's recipe)", False)


def build_student(settings: ModelSettings, num_classes: int, resolution: int | None = None,
                  crop_ratio: float | None = None) -> TappedModel:
    """The student a run's `model` section describes; `resolution`, the input size it will
    be evaluated at, and `crop_ratio`, the imagenet pipeline's validation center crop, go into
    its spec (and so into its checkpoints)."""
    options = {"blurpool": True} if settings.blurpool else {}
    model = build_model(settings.arch, num_classes, settings.normalization, settings.width_mult,
                        **options)
    model.spec = replace(model.spec, resolution=resolution, crop_ratio=crop_ratio)
    return model


def conventional_resolution(arch: str) -> int:
    """The input size `arch` is made for (32 for CIFAR networks, 224 for ImageNet ones): what
    a checkpoint that does not record its resolution is taken to expect."""
    return ARCHITECTURES[arch][1]


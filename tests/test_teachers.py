"""fastibd.models.teachers: every checkpoint layout people have, and the errors they hit."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

from fastibd.errors import UserError
from fastibd.models import TappedModel, build_model
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.models.teachers import load_checkpoint, load_teacher

PYAUTOATTACK = Path(importlib.util.find_spec("pyautoattack").origin).parent / "examples"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN layers non-trivial running statistics, so eval-mode logits depend on them."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def assert_teacher(teacher: TappedModel, reference, x: torch.Tensor) -> None:
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference(x), rtol=1e-5, atol=1e-5)


def test_pyautoattack_real_resnet18_matches_its_reference_code() -> None:
    spec = importlib.util.spec_from_file_location("aa_resnet", PYAUTOATTACK / "resnet.py")
    aa_resnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aa_resnet)
    reference = aa_resnet.ResNet18()
    reference.load_state_dict(torch.load(PYAUTOATTACK / "model_test.pt", map_location="cpu",
                                         weights_only=True))
    teacher = load_teacher("resnet18", PYAUTOATTACK / "model_test.pt")  # raw [0,1] input
    assert teacher.spec.normalization == "none" and teacher.spec.num_classes == 10
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_teacher(teacher, reference.eval(), x)
    assert teacher(x).argmax(1).unique().numel() > 1  # real weights, not a constant


def test_fastibd_checkpoint_round_trip(tmp_path: Path) -> None:
    model = randomized(build_model("preact_resnet18", 100, "cifar100", width_mult=1 / 8))
    path = atomic_save(model_checkpoint(model, epoch=3), tmp_path / "run" / "best.pt")
    teacher = load_teacher(None, path)
    assert teacher.spec == model.spec
    assert_teacher(teacher, model, torch.rand(2, 3, 32, 32))
    with pytest.raises(UserError, match="holds a preact_resnet18"):
        load_teacher("resnet18", path)


def test_robustbench_cifar_wrn_with_sub_block1(tmp_path: Path) -> None:
    # TRADES' WRN-34-10 as RobustBench ships it: 'state_dict', DataParallel prefix, the unused
    # sub_block1, raw [0,1] inputs.
    model = randomized(build_model("wrn34_10", 10, "none", width_mult=1 / 10, sub_block1=True))
    state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 76}, tmp_path / "Zhang2019Theoretically.pt")
    teacher = load_teacher("wrn34_10", tmp_path / "Zhang2019Theoretically.pt", width_mult=1 / 10)
    assert teacher.spec.options == {"sub_block1": True}
    assert_teacher(teacher, model, torch.rand(2, 3, 32, 32))


def test_robustbench_imagenet_normalize_model_layout(tmp_path: Path) -> None:
    # Salman2020Do_R50: normalize_model(resnet50(), mu, sigma) -> normalize.* and model.* keys.
    model = randomized(build_model("resnet50", 1000, "imagenet", width_mult=1 / 16))
    state = {"model." + k: v for k, v in model.state_dict().items()}
    state["normalize.mean"] = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    state["normalize.std"] = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.save(state, tmp_path / "Salman2020Do_R50.pt")
    teacher = load_teacher("resnet50", tmp_path / "Salman2020Do_R50.pt", width_mult=1 / 16)
    assert teacher.spec.normalization == "imagenet"
    assert_teacher(teacher, model, torch.rand(2, 3, 64, 64))


def robustness_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """MadryLab robustness layout; its args Namespace makes it a full pickle."""
    inner = {}
    for key, value in model.state_dict().items():
        inner["module.model." + key] = value
        inner["module.attacker.model." + key] = value.clone()
    inner["module.normalizer.new_mean"] = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    inner["module.normalizer.new_std"] = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    inner["module.attacker.normalize.new_mean"] = inner["module.normalizer.new_mean"].clone()
    torch.save({"model": inner, "epoch": 90, "args": argparse.Namespace(eps=4.0)}, path)
    return path


def test_robustness_library_needs_trust_flag(tmp_path: Path) -> None:
    model = randomized(build_model("resnet50", 1000, "imagenet", width_mult=1 / 16))
    path = robustness_checkpoint(model, tmp_path / "imagenet_linf_4.pt")
    with pytest.raises(UserError, match="trust-pickle") as refused:
        load_teacher("resnet50", path, width_mult=1 / 16)
    assert "argparse.Namespace" in str(refused.value)
    teacher = load_teacher("resnet50", path, width_mult=1 / 16, trust_pickle=True)
    assert teacher.spec.normalization == "imagenet"
    assert_teacher(teacher, model, torch.rand(2, 3, 64, 64))


def test_torchvision_state_dict(tmp_path: Path) -> None:
    reference = randomized(torchvision.models.resnet18(num_classes=1000))
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    teacher = load_teacher("resnet18_imagenet", tmp_path / "resnet18.pth")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert_teacher(teacher, lambda x: reference((x - mean) / std), torch.rand(2, 3, 64, 64))


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_pickle_carrying_code_is_refused(tmp_path: Path) -> None:
    witness = tmp_path / "code-ran"
    model = build_model("resnet18", width_mult=1 / 8)
    torch.save({"state_dict": model.state_dict(), "hook": _RunsCode(witness)},
               tmp_path / "evil.pt")
    with pytest.raises(UserError, match="arbitrary code"):
        load_teacher("resnet18", tmp_path / "evil.pt", width_mult=1 / 8)
    assert not witness.exists()
    load_teacher("resnet18", tmp_path / "evil.pt", width_mult=1 / 8, trust_pickle=True)
    assert witness.exists()  # the payload is real: only the default refusal kept it out


def test_truncated_wrong_arch_and_wrong_classes(tmp_path: Path) -> None:
    model = randomized(build_model("resnet18", 10, "none", width_mult=1 / 8))
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or not a PyTorch checkpoint"):
        load_teacher("resnet18", truncated, width_mult=1 / 8)

    with pytest.raises(UserError) as wrong_arch:
        load_teacher("preact_resnet18", good, width_mult=1 / 8)
    message = str(wrong_arch.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "format 'state_dict'" in message and "\n" not in message

    with pytest.raises(UserError, match=r"shape conflicts.*linear\.weight.*num_classes"):
        load_teacher("resnet18", good, num_classes=100, width_mult=1 / 8)
    with pytest.raises(UserError, match=r"shape conflicts.*architecture or width_mult"):
        load_teacher("resnet18", good, width_mult=1 / 4)
    with pytest.raises(UserError, match="no checkpoint file"):
        load_teacher("resnet18", tmp_path / "missing.pt")
    # an override of the file's own normalization is obeyed, and said
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {"normalize.mean": torch.zeros(3), "normalize.std": torch.ones(3) * 0.5}
    torch.save(state, tmp_path / "normed.pt")
    loaded = load_checkpoint("resnet18", tmp_path / "normed.pt", normalization="cifar10",
                             width_mult=1 / 8)
    assert loaded.model.spec.normalization == "cifar10" and loaded.format == "robustbench"
    (note,) = loaded.notes
    assert "saved with normalization ((0.0, 0.0, 0.0), (0.5, 0.5, 0.5)); using cifar10" in note
    assert load_checkpoint("resnet18", tmp_path / "normed.pt", width_mult=1 / 8).notes == []


def test_a_whole_pickled_model_loads_when_trusted(tmp_path: Path) -> None:
    """torch.save(model) of our model and of a foreign nn.Module (torchvision's ResNet):
    refused by default (a pickle can run code), loaded with trust, and said so."""
    ours = randomized(build_model("resnet18", 10, "cifar10", width_mult=1 / 8))
    torch.save(ours, tmp_path / "ours.pt")
    with pytest.raises(UserError, match="trust-pickle"):
        load_teacher(None, tmp_path / "ours.pt")
    loaded = load_checkpoint(None, tmp_path / "ours.pt", trust_pickle=True)
    assert loaded.model.spec == ours.spec and "whole pickled CifarResNet" in loaded.notes[0]
    assert_teacher(loaded.model, ours, torch.rand(2, 3, 32, 32))

    foreign = randomized(torchvision.models.resnet18(num_classes=10))
    torch.save(foreign, tmp_path / "foreign.pt")
    loaded = load_checkpoint("resnet18_imagenet", tmp_path / "foreign.pt", trust_pickle=True)
    assert "whole pickled ResNet module" in loaded.notes[0]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert_teacher(loaded.model, lambda x: foreign((x - mean) / std), torch.rand(2, 3, 64, 64))


GARBAGE = {  # bytes that have broken the weights-only unpickler in different ways
    "empty": b"", "text": b"hello world\n", "random": bytes(range(256)) * 8,
    "protocol 2 header": b"\x80\x02", "dict opcode, cut": b"\x80\x02}q\x00(X",
    "zip, not torch": b"PK\x03\x04" + b"\x00" * 40,
    "protocol 4 frame": b"\x80\x04\x95" + b"\x07" * 9,
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_is_one_line_without_torch_advice(name: str, tmp_path: Path,
                                                  recwarn: pytest.WarningsRecorder) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(GARBAGE[name])
    for trust in (False, True):
        with pytest.raises(UserError) as refused:
            load_teacher("resnet18", path, trust_pickle=trust)
        message = str(refused.value)
        assert "\n" not in message and "weights_only" not in message, message
        assert str(path) in message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_a_directory_is_not_called_missing(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    torch.save(build_model("resnet18", width_mult=1 / 8).state_dict(), tmp_path / "run" / "best.pt")
    with pytest.raises(UserError, match=r"run is a directory, not a checkpoint file \(did you "
                                        r"mean .*run/best\.pt\?\)"):
        load_teacher("resnet18", tmp_path / "run")

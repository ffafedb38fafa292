"""One training step's documented choices (docs/method.md): which input the teacher's taps
come from, and which parameters weight decay applies to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastibd.device import Runtime
from fastibd.method.attacks import AttackSettings
from fastibd.method.modes import MODES, LossSettings
from fastibd.method.step import build_step
from fastibd.models import build_model
from fastibd.train import Trainer
from fastibd.train.settings import load_settings


class Recording(nn.Module):
    """Calls `inner` and keeps what it was called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.inner(*args, **kwargs)

    def feature_shapes(self, resolution: int):
        return self.inner.feature_shapes(resolution)


@pytest.mark.parametrize("teacher_input", ["natural", "adv"])
def test_teacher_taps_come_from_the_chosen_input(teacher_input: str) -> None:
    torch.manual_seed(0)
    teacher = Recording(build_model("resnet18", 10, "none", 1 / 16).eval())
    student = build_model("resnet18", 10, "none", 1 / 16)
    runtime = Runtime(torch.device("cpu"), torch.float32, torch.contiguous_format, False)
    step = build_step(student, teacher, LossSettings("ibd", teacher_input=teacher_input,
                                                     attention_dim=8),
                      AttackSettings(steps=2), runtime, resolution=8,
                      make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                      attack_rng=torch.Generator().manual_seed(0))
    step.forward = objective = Recording(step.forward)  # record what the loss is given
    x = torch.rand(4, 3, 8, 8)
    step(x, torch.randint(0, 10, (4,)))

    ((args, _),) = objective.calls
    x_seen, x_adv, _, probs, teacher_feats = args
    assert torch.equal(x_seen, x) and not torch.equal(x_adv, x)
    with torch.no_grad():  # soft labels from the natural batch, always
        torch.testing.assert_close(probs, torch.softmax(teacher.inner(x), 1))
        taps_input = x if teacher_input == "natural" else x_adv
        _, want_feats = teacher.inner(taps_input, features=True)
    for got, want in zip(teacher_feats, want_feats, strict=True):
        torch.testing.assert_close(got, want)
    expected_calls = 1 if teacher_input == "natural" else 2
    assert len(teacher.calls) == expected_calls


@pytest.mark.parametrize("decay_all", [True, False])
def test_weight_decay_reaches_the_parameters_it_says(digits_dir: Path, tmp_path: Path,
                                                      decay_all: bool) -> None:
    """Default (the paper and the IBD code): every parameter, norm weights and biases too.
    optim.decay_norm_and_bias=false exempts the 1-D ones."""
    settings = load_settings([
        "--cfg", "smoke_teacher", f"--data.train_path={digits_dir / 'train.beton'}",
        f"--data.val_path={digits_dir / 'val.beton'}", "--data.holdout=64",
        f"--training.out_dir={tmp_path}", f"--optim.decay_norm_and_bias={decay_all}"])
    trainer = Trainer(settings)
    decay = {id(p) for g in trainer.step.optimizer.param_groups if g["weight_decay"] == 5e-4
             for p in g["params"]}
    for name, param in trainer.step.objective.named_parameters():
        assert (id(param) in decay) == (decay_all or param.ndim > 1), name


EXPECTED_PARTS = {"ibd": {"kl_nat", "kl_adv", "feat", "total"},
                  "natural_ibd": {"kl_nat", "kl_adv", "feat", "total"},
                  "rslad": {"kl_nat", "kl_adv", "total"}, "kd": {"kl", "total"},
                  "trades": {"ce", "kl", "total"}, "pgd_at": {"ce", "total"},
                  "fast_at": {"ce", "total"}, "standard": {"ce", "total"}}


@pytest.mark.parametrize("mode", list(MODES))
def test_one_real_step_of_every_mode(mode: str) -> None:
    """The step each mode's registry entry builds: it trains the student (and, for the two
    IBD modes, the attention module), logs its loss parts, and attacks only when the mode
    does."""
    distils_taps = mode in ("ibd", "natural_ibd")
    torch.manual_seed(0)
    student = build_model("resnet18", 10, "none", 1 / 16)
    teacher = build_model("resnet18", 10, "none", 1 / 16).eval().requires_grad_(False)
    runtime = Runtime(torch.device("cpu"), torch.float32, torch.contiguous_format, False)
    step = build_step(student, teacher if MODES[mode].teacher else None,
                      LossSettings(mode, attention_dim=8), AttackSettings(steps=2), runtime,
                      resolution=8, make_optimizer=lambda m: torch.optim.SGD(m.parameters(),
                                                                             lr=0.1),
                      attack_rng=torch.Generator().manual_seed(0))
    assert (step.objective.features is not None) == distils_taps
    before = [p.detach().clone() for p in step.objective.parameters()]
    attacked = []
    real_adversarial = step.mode.adversarial

    def recording(*args):
        x_adv = real_adversarial(*args)
        attacked.append(x_adv is not None)
        return x_adv

    step.mode = type("Recorded", (), {"adversarial": staticmethod(recording)})()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    loss, parts = step(x, y)
    assert torch.isfinite(loss) and set(parts) == EXPECTED_PARTS[mode]
    assert attacked == [mode not in ("natural_ibd", "kd", "standard")]
    changed = [not torch.equal(a, b) for a, b in zip(before, step.objective.parameters(),
                                                     strict=True)]
    assert any(changed[:len(list(student.parameters()))])  # the student trained
    if distils_taps:  # and so did the attention module
        assert any(changed[len(list(student.parameters())):])

"""One training step's documented choices (docs/method.md): which input the teacher's taps
come from, and which parameters weight decay applies to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fastibd.config import as_dict, load_config
from fastibd.method.loss import FeatureDistillation
from fastibd.method.objective import AttackSettings, LossSettings, TrainingObjective
from fastibd.method.step import assemble_step
from fastibd.train import Trainer
from tests.tiny import TapNet


class Recording(nn.Module):
    """Calls `inner` and keeps what it was called with."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("teacher_input", ["natural", "adv"])
def test_teacher_taps_come_from_the_chosen_input(teacher_input: str) -> None:
    teacher = Recording(TapNet((4, 6), batchnorm=True, seed=0).eval())
    student = TapNet((3, 5), batchnorm=True, seed=1)
    features = FeatureDistillation([4, 6], [3, 5], 8, backend="eager")
    objective = Recording(TrainingObjective(student, LossSettings("ibd"), features))
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    step = assemble_step(objective.inner, teacher, mode="ibd", attack=AttackSettings(steps=2),
                         temperature=1.0, optimizer=optimizer,
                         scaler=torch.amp.GradScaler("cpu", enabled=False), scheduler=None,
                         dtype=torch.float32, attack_rng=torch.Generator().manual_seed(0),
                         compiled=False, teacher_input=teacher_input)
    step.objective = objective  # record what the loss is given
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
    settings = as_dict(load_config([
        "--cfg", "smoke_teacher", f"--data.train_path={digits_dir / 'train.beton'}",
        f"--data.val_path={digits_dir / 'val.beton'}", "--data.holdout=64",
        f"--training.out_dir={tmp_path}", f"--optim.decay_norm_and_bias={decay_all}"]))
    trainer = Trainer(settings)
    decay = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] == 5e-4
             for p in g["params"]}
    for name, param in trainer.objective.named_parameters():
        assert (id(param) in decay) == (decay_all or param.ndim > 1), name

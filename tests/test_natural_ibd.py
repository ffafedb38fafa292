"""loss.mode=natural_ibd: IBD's loss with x_adv = x (the paper's "natural" IBD): no attack
runs, the loss is ibd_loss on the clean batch, and a run trains end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fastibd.device import Runtime
from fastibd.method import attacks
from fastibd.method.attacks import AttackSettings
from fastibd.method.loss import ibd_loss, soft_labels
from fastibd.method.modes import LossSettings, TrainingObjective
from fastibd.method.step import build_step, feature_distillation
from fastibd.models import build_model
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.run_dir import read_metrics
from fastibd.train import main
from tests.conftest import data_args

CPU = Runtime(torch.device("cpu"), torch.float32, torch.contiguous_format, False)


def tiny_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny student and a tiny frozen teacher (different weights)."""
    torch.manual_seed(seed)
    student = build_model("resnet18", 10, "none", 1 / 16)
    teacher = build_model("resnet18", 10, "none", 1 / 16).eval().requires_grad_(False)
    return student, teacher


def student_passes_and_rng(mode: str, teacher_input: str = "natural", steps: int = 3,
                           teacher_passes: list | None = None
                           ) -> tuple[int, bool, dict[str, torch.Tensor]]:
    """One step of `mode`: how often the student ran forward, whether the attack's
    generator drew noise, and the logged loss parts (the teacher's passes are appended to
    `teacher_passes` when given)."""
    student, teacher = tiny_pair()
    rng = torch.Generator().manual_seed(0)
    step = build_step(student, teacher, LossSettings(mode, attention_dim=8,
                                                     teacher_input=teacher_input),
                      AttackSettings(steps=steps), CPU, resolution=8,
                      make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                      attack_rng=rng)
    passes = []
    student.register_forward_hook(lambda *_: passes.append(1))
    if teacher_passes is not None:
        teacher.register_forward_hook(lambda *_: teacher_passes.append(1))
    before = rng.get_state()
    _, parts = step(torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,)))
    return len(passes), not torch.equal(rng.get_state(), before), parts


@pytest.mark.parametrize("teacher_input", ["natural", "adv"])
def test_natural_ibd_runs_no_attack(teacher_input: str) -> None:
    # IBD: `steps` attack passes + its natural pass + its adversarial pass with taps.
    ibd_passes, ibd_drew, _ = student_passes_and_rng("ibd", teacher_input, steps=3)
    assert (ibd_passes, ibd_drew) == (3 + 2, True)
    # natural IBD: the loss's single pass on the clean batch, and no attack noise drawn.
    teacher_passes: list = []
    passes, drew, parts = student_passes_and_rng("natural_ibd", teacher_input, steps=3,
                                                 teacher_passes=teacher_passes)
    assert (passes, drew) == (1, False)
    assert torch.equal(parts["kl_nat"], parts["kl_adv"]) and parts["feat"] > 0
    # nothing attacked: the teacher's logits and taps come from one pass on the clean batch
    assert len(teacher_passes) == 1


def test_natural_ibd_loss_is_ibd_loss_with_x_adv_equal_to_x() -> None:
    student, teacher = tiny_pair()
    settings = LossSettings("natural_ibd", alpha=0.7, beta=0.5, attention_dim=8,
                            backend="eager")
    features = feature_distillation(teacher, student, 8, 8, "eager")
    objective = TrainingObjective(student, settings, features)
    # The IBD objective on identical copies, given the clean batch as its adversarial one.
    ibd = TrainingObjective(copy.deepcopy(student), LossSettings("ibd", alpha=0.7, beta=0.5),
                            copy.deepcopy(features))
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    with torch.no_grad():
        teacher_logits, teacher_feats = teacher(x, features=True)
    probs = soft_labels(teacher_logits)

    total, parts = objective(x, None, y, probs, teacher_feats)
    logits, s_feats = copy.deepcopy(student)(x, features=True)
    by_hand = ibd_loss(logits, logits, probs, copy.deepcopy(features)(teacher_feats, s_feats),
                       alpha=0.7, beta=0.5)
    torch.testing.assert_close(total, by_hand.total)
    assert set(parts) == set(by_hand.parts)
    for name, value in by_hand.parts.items():
        torch.testing.assert_close(parts[name], value)

    ibd_total, _ = ibd(x, x, y, probs, teacher_feats)
    torch.testing.assert_close(total, ibd_total)
    grads = torch.autograd.grad(total, list(objective.parameters()))
    ibd_grads = torch.autograd.grad(ibd_total, list(ibd.parameters()))
    for got, want in zip(grads, ibd_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_natural_ibd_run_trains_end_to_end(digits_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_attack(*args, **kwargs):
        raise AssertionError("natural IBD attacked")

    monkeypatch.setattr(attacks, "kl_attack", no_attack)
    monkeypatch.setattr(attacks, "ce_attack", no_attack)
    torch.manual_seed(1)
    teacher = build_model("resnet18", 10, "none", 0.125)
    teacher_path = atomic_save(model_checkpoint(teacher), tmp_path / "teacher" / "best.pt")
    out = tmp_path / "run"
    # No held-out slice: a random teacher would (rightly) fail the teacher check.
    assert main(["--cfg", "smoke", *data_args(digits_dir), "--loss.mode=natural_ibd",
                 f"--teacher.path={teacher_path}", "--data.holdout=0", "--training.epochs=2",
                 "--training.max_steps=3", "--logging.progress=false",
                 f"--training.out_dir={out}"]) == 0
    records = read_metrics(out)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and any(r["kind"] == "final" for r in records)
    for record in epochs:
        assert record["loss_kl_nat"] == record["loss_kl_adv"]
        assert record["loss_feat"] > 0
        assert all(torch.isfinite(torch.tensor(v)) for k, v in record.items()
                   if k.startswith("loss_"))

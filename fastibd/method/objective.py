"""What one training step computes for each mode: the attack, then the loss.

`TrainingObjective` is the module the optimizer, DDP and torch.compile see: it owns the
student and, for IBD, the feature-distillation attention module, so both train together
and DDP synchronizes both. The attack runs outside it on the raw student (input
gradients only, eval mode; see fastibd.method.attacks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastibd.method import attacks
from fastibd.method.loss import (
    FeatureDistillation,
    LossOutput,
    ibd_loss,
    kd_loss,
    pgd_at_loss,
    rslad_loss,
    trades_loss,
)

TEACHER_MODES = ("ibd", "rslad", "kd")  # modes that distil from a teacher
ATTACK_MODES = ("ibd", "rslad", "trades", "pgd_at", "fast_at")


@dataclass(frozen=True)
class AttackSettings:
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    start: str = "normal"
    fgsm_alpha: float = 1.25  # single-step attacks: step = fgsm_alpha * eps


@dataclass(frozen=True)
class LossSettings:
    mode: str = "ibd"
    alpha: float = 0.9
    beta: float = 0.8
    temperature: float = 1.0
    trades_beta: float = 6.0
    rslad_scale: float = 1.0  # RSLAD's CIFAR-100 scripts use 10 (fastibd.method.loss.rslad_loss)


def make_adversarial(mode: str, student: nn.Module, x: Tensor, y: Tensor,
                     teacher_probs: Tensor | None, settings: AttackSettings,
                     generator: torch.Generator | None) -> Tensor | None:
    """The adversarial batch a mode trains on (None for kd and standard).

    One step (steps == 1) means FGSM with a random start of fgsm_alpha * eps: Fast-IBD
    (KL to the teacher) and Fast-AT (cross-entropy)."""
    if mode not in ATTACK_MODES:
        return None
    if mode in ("ibd", "rslad", "trades"):
        target = teacher_probs if mode != "trades" else attacks.model_probs(student, x)
        if settings.steps == 1:
            return attacks.fgsm_rs(student, x, target, settings.eps,
                                   settings.fgsm_alpha * settings.eps, generator)
        return attacks.kl_pgd(student, x, target, settings.eps, settings.step_size,
                              settings.steps, settings.start, generator)
    if mode == "fast_at" or settings.steps == 1:
        return attacks.fgsm_rs(student, x, y, settings.eps, settings.fgsm_alpha * settings.eps,
                               generator)
    return attacks.pgd_ce(student, x, y, settings.eps, settings.step_size, settings.steps,
                          True, generator)


class TrainingObjective(nn.Module):
    """forward(x, x_adv, y, teacher_probs, teacher_feats) -> (total loss, logged parts)."""

    def __init__(self, student: nn.Module, settings: LossSettings,
                 features: FeatureDistillation | None = None) -> None:
        super().__init__()
        if settings.mode == "ibd" and settings.beta != 0 and features is None:
            raise ValueError("ibd with beta != 0 needs the feature-distillation module")
        self.student = student
        self.features = features
        self.settings = settings

    def forward(self, x: Tensor, x_adv: Tensor | None, y: Tensor, teacher_probs: Tensor | None,
                teacher_feats: Sequence[Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        out = self._loss(x, x_adv, y, teacher_probs, teacher_feats)
        return out.total, out.parts

    def _loss(self, x: Tensor, x_adv: Tensor | None, y: Tensor, teacher_probs: Tensor | None,
              teacher_feats: Sequence[Tensor] | None) -> LossOutput:
        s = self.settings
        if s.mode == "ibd":
            s_nat = self.student(x)
            if self.features is not None and s.beta != 0:
                s_adv, s_feats = self.student(x_adv, features=True)
                feat = self.features(teacher_feats, s_feats)
            else:
                s_adv, feat = self.student(x_adv), None
            return ibd_loss(s_nat, s_adv, teacher_probs, feat, alpha=s.alpha, beta=s.beta,
                            temperature=s.temperature)
        if s.mode == "rslad":
            return rslad_loss(self.student(x), self.student(x_adv), teacher_probs,
                              alpha=s.alpha, scale=s.rslad_scale)
        if s.mode == "kd":
            return kd_loss(self.student(x), teacher_probs, temperature=s.temperature)
        if s.mode == "trades":
            return trades_loss(self.student(x), self.student(x_adv), y, beta=s.trades_beta)
        if s.mode in ("pgd_at", "fast_at"):
            return pgd_at_loss(self.student(x_adv), y)
        if s.mode == "standard":  # the same cross-entropy, on clean inputs
            return pgd_at_loss(self.student(x), y)
        raise ValueError(f"unknown mode {s.mode!r}")

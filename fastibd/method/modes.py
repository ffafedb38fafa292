"""The training modes, one object each: whether it distils a teacher (and its taps), which
batch it attacks, and what it minimizes. The configuration's choices, the step, the trainer
and the benchmarks all read `MODES`.

    ibd          the paper: soft labels on natural and adversarial inputs + feature distillation
    natural_ibd  the paper's "natural" IBD: the same loss on clean inputs only, no attack
    rslad        RSLAD (Zi et al. 2021): the soft-label terms, with RSLAD's own KL scale
    kd           knowledge distillation on clean inputs
    trades       TRADES (Zhang et al. 2019): CE + beta KL to the model's own clean output
    pgd_at       PGD adversarial training (Madry et al. 2018)
    fast_at      FGSM from a random start (Wong et al. 2020)
    standard     cross-entropy on clean inputs

`TrainingObjective` is the module the optimizer, DDP and torch.compile see: it owns the
student and, for IBD, the feature-distillation attention module, so both train together
and DDP synchronizes both. The attack runs outside it, on the raw student (input gradients
only, eval mode; fastibd.method.attacks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastibd.config import Choice, Integer, Number, option, section
from fastibd.method import attacks
from fastibd.method.attacks import AttackSettings
from fastibd.method.loss import (
    BACKENDS,
    FeatureDistillation,
    LossOutput,
    ibd_loss,
    kd_loss,
    pgd_at_loss,
    rslad_loss,
    trades_loss,
)


class Mode:
    """One way to train. `teacher`: it distils a teacher's soft labels. Subclasses say which
    batch they attack (`adversarial`, None for none) and what they minimize (`loss`)."""

    name = ""
    teacher = False

    @property
    def attacks(self) -> bool:
        """Whether it trains on adversarial examples: it defines its own `adversarial`."""
        return type(self).adversarial is not Mode.adversarial

    def distils_features(self, settings: LossSettings) -> bool:
        """Whether the step asks the teacher for its taps (IBD with beta != 0)."""
        return False

    def adversarial(self, student: nn.Module, x: Tensor, y: Tensor,
                    teacher_probs: Tensor | None, attack: AttackSettings,
                    generator: torch.Generator | None) -> Tensor | None:
        return None

    def loss(self, objective: TrainingObjective, x: Tensor, x_adv: Tensor | None, y: Tensor,
             teacher_probs: Tensor | None, teacher_feats: Sequence[Tensor] | None
             ) -> LossOutput:
        raise NotImplementedError


class IBD(Mode):
    name, teacher = "ibd", True

    def distils_features(self, settings: LossSettings) -> bool:
        return settings.beta != 0

    def adversarial(self, student, x, y, teacher_probs, attack, generator):
        return attacks.kl_attack(student, x, teacher_probs, attack, generator)

    def loss(self, objective, x, x_adv, y, teacher_probs, teacher_feats):
        s_nat = objective.student(x)
        s_adv, feat = _distilled_logits(objective, x_adv, teacher_feats)
        return _weighted_ibd_loss(objective.settings, s_nat, s_adv, teacher_probs, feat)


class NaturalIBD(IBD):
    """The paper's "natural" IBD: IBD's loss with x_adv = x, no adversarial training. The
    teacher's soft labels and taps still distil; nothing is attacked."""

    name = "natural_ibd"
    # Mode's own, not an override returning None: what does not override `adversarial` is
    # a mode without an attack (Mode.attacks reads it so).
    adversarial = Mode.adversarial

    def loss(self, objective, x, x_adv, y, teacher_probs, teacher_feats):
        # x_adv = x makes IBD's two student passes the same one: run it once, so the BN
        # running statistics see the batch once, as in any clean training step.
        logits, feat = _distilled_logits(objective, x, teacher_feats)
        return _weighted_ibd_loss(objective.settings, logits, logits, teacher_probs, feat)


def _distilled_logits(objective: TrainingObjective, x: Tensor,
                      teacher_feats: Sequence[Tensor] | None) -> tuple[Tensor, Tensor | None]:
    """The student's logits on `x`, and the feature loss of its taps against the teacher's
    when the objective distils them (None otherwise: beta = 0 skips the taps)."""
    if objective.features is None or objective.settings.beta == 0:
        return objective.student(x), None
    logits, s_feats = objective.student(x, features=True)
    return logits, objective.features(teacher_feats, s_feats)


def _weighted_ibd_loss(s: LossSettings, s_nat: Tensor, s_adv: Tensor, teacher_probs: Tensor,
                       feat: Tensor | None) -> LossOutput:
    """`ibd_loss` with the weights and temperature of the loss settings."""
    return ibd_loss(s_nat, s_adv, teacher_probs, feat, alpha=s.alpha, beta=s.beta,
                    temperature=s.temperature)


class RSLAD(Mode):
    name, teacher = "rslad", True

    def adversarial(self, student, x, y, teacher_probs, attack, generator):
        return attacks.kl_attack(student, x, teacher_probs, attack, generator)

    def loss(self, objective, x, x_adv, y, teacher_probs, teacher_feats):
        s, student = objective.settings, objective.student
        return rslad_loss(student(x), student(x_adv), teacher_probs, alpha=s.alpha,
                          scale=s.rslad_scale)


class KD(Mode):
    name, teacher = "kd", True

    def loss(self, objective, x, x_adv, y, teacher_probs, teacher_feats):
        return kd_loss(objective.student(x), teacher_probs,
                       temperature=objective.settings.temperature)


class TRADES(Mode):
    name = "trades"

    def adversarial(self, student, x, y, teacher_probs, attack, generator):
        return attacks.kl_attack(student, x, attacks.model_probs(student, x), attack, generator)

    def loss(self, objective, x, x_adv, y, teacher_probs, teacher_feats):
        student = objective.student
        return trades_loss(student(x), student(x_adv), y, beta=objective.settings.trades_beta)


class PGDAT(Mode):
    name = "pgd_at"

    def adversarial(self, student, x, y, teacher_probs, attack, generator):
        return attacks.ce_attack(student, x, y, attack, generator)

    def loss(self, objective, x, x_adv, y, teacher_probs, teacher_feats):
        return pgd_at_loss(objective.student(x_adv), y)


class FastAT(PGDAT):
    name = "fast_at"

    def adversarial(self, student, x, y, teacher_probs, attack, generator):
        return attacks.ce_attack(student, x, y, attack, generator, single_step=True)


class Standard(Mode):
    name = "standard"

    def loss(self, objective, x, x_adv, y, teacher_probs, teacher_feats):
        return pgd_at_loss(objective.student(x), y)  # the same cross-entropy, on clean inputs


MODES: dict[str, Mode] = {mode.name: mode for mode in
                          (IBD(), NaturalIBD(), RSLAD(), KD(), TRADES(), PGDAT(), FastAT(),
                           Standard())}


@section("loss", "Objective")
class LossSettings:
    mode: str = option(Choice(*MODES), ", ".join(MODES) + " (docs/method.md)", "ibd")
    alpha: float = option(Number(0, 1), "weight of the adversarial soft-label term (the paper: "
                          "0.9; the IBD code: 0.8; RSLAD: 5/6)", 0.9)
    beta: float = option(Number(0, 1e6), "weight of the feature-distillation term", 0.8)
    temperature: float = option(Number(0.01, 100), "soft-label temperature", 1.0)
    attention_dim: int = option(Integer(1), "query/key dimension of the attention module", 128)
    trades_beta: float = option(Number(0, 1e6), "TRADES robustness weight", 6.0)
    rslad_scale: float = option(Number(0, 1e6), "rslad: factor on RSLAD's KL, which its code "
                                "averages over batch x classes (its CIFAR-100 scripts use 10)",
                                1.0)
    teacher_input: str = option(Choice("natural", "adv"), "ibd: the input the teacher's taps "
                                "come from: natural (the IBD code) or adv (the paper's text); "
                                "soft labels always come from the natural input", "natural")
    backend: str = option(Choice(*BACKENDS), "feature-loss kernels: fused Triton kernels on "
                          "CUDA, eager reference elsewhere", "auto")


class TrainingObjective(nn.Module):
    """forward(x, x_adv, y, teacher_probs, teacher_feats) -> (total loss, logged parts)."""

    def __init__(self, student: nn.Module, settings: LossSettings,
                 features: FeatureDistillation | None = None) -> None:
        super().__init__()
        self.mode = MODES[settings.mode]
        if self.mode.distils_features(settings) and features is None:
            raise ValueError(f"{settings.mode} with beta={settings.beta} needs the "
                             "feature-distillation module")
        self.student = student
        self.features = features
        self.settings = settings

    def forward(self, x: Tensor, x_adv: Tensor | None, y: Tensor, teacher_probs: Tensor | None,
                teacher_feats: Sequence[Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.mode.loss(self, x, x_adv, y, teacher_probs, teacher_feats)
        return out.total, out.parts

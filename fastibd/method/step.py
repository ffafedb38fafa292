"""One optimization step of robust training: teacher forward, attack, student forward and
backward, optimizer. The trainer and the step benchmark run this same code."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastibd.method.loss import FeatureDistillation, soft_labels
from fastibd.method.objective import AttackSettings, TrainingObjective, make_adversarial
from fastibd.models import TappedModel


@dataclass
class TrainingStep:
    """`step(x, y) -> (loss, parts)` on a batch already in the right device and layout.

    `objective` (a TrainingObjective, maybe compiled or DDP-wrapped) owns the student;
    `attack_model` is the student as the attack calls it (maybe compiled); `teacher` is
    None for modes without one; `distil_features` asks the teacher for its taps, on the
    natural batch (as the IBD code) or, with teacher_input="adv", on the adversarial one
    (the paper's text); the soft labels always come from the natural batch."""

    objective: nn.Module
    attack_model: nn.Module
    student: nn.Module
    teacher: nn.Module | None
    distil_features: bool
    mode: str
    attack: AttackSettings
    temperature: float
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    dtype: torch.dtype
    attack_rng: torch.Generator | None
    teacher_input: str = "natural"

    def autocast(self, device_type: str):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self.student.train()
        with self.autocast(x.device.type):
            teacher_probs = teacher_feats = None
            taps_from_adv = self.distil_features and self.teacher_input == "adv"
            if self.teacher is not None:
                with torch.no_grad():
                    if self.distil_features and not taps_from_adv:
                        teacher_logits, teacher_feats = self.teacher(x, features=True)
                    else:
                        teacher_logits = self.teacher(x)
                teacher_probs = soft_labels(teacher_logits, self.temperature)
            x_adv = make_adversarial(self.mode, self.attack_model, x, y, teacher_probs,
                                     self.attack, self.attack_rng)
            if taps_from_adv:
                with torch.no_grad():
                    _, teacher_feats = self.teacher(x_adv, features=True)
            total, parts = self.objective(x, x_adv, y, teacher_probs, teacher_feats)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return total.detach(), parts


def feature_distillation(teacher: TappedModel, student: TappedModel, resolution: int,
                         dim: int = 128, backend: str = "auto") -> FeatureDistillation:
    """The IBD feature head sized from the channels both models tap at `resolution`."""
    return FeatureDistillation([c for c, _, _ in teacher.feature_shapes(resolution)],
                               [c for c, _, _ in student.feature_shapes(resolution)],
                               dim, backend)


def assemble_step(objective: TrainingObjective, teacher: nn.Module | None, *, mode: str,
                  attack: AttackSettings, temperature: float,
                  optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None, dtype: torch.dtype,
                  attack_rng: torch.Generator | None, compiled: bool,
                  compile_mode: str | None = None, ddp: bool = False,
                  device_ids: list[int] | None = None,
                  teacher_input: str = "natural") -> TrainingStep:
    """A TrainingStep around `objective`: wrapped in DDP when `ddp` (gradients are then
    all-reduced by the objective's backward), then compiled when `compiled`. The attack
    calls its own compiled copy of the student, the teacher its own too: three graphs
    that each stay the same from step to step."""
    step_objective: nn.Module = objective
    if ddp:
        step_objective = nn.parallel.DistributedDataParallel(objective, device_ids=device_ids)
    attack_model: nn.Module = objective.student
    teacher_model = teacher
    if compiled:
        step_objective = torch.compile(step_objective, mode=compile_mode)
        attack_model = torch.compile(objective.student, mode=compile_mode)
        if teacher is not None:
            teacher_model = torch.compile(teacher, mode=compile_mode)
    return TrainingStep(step_objective, attack_model, objective.student, teacher_model,
                        objective.features is not None, mode, attack, temperature, optimizer,
                        scaler, scheduler, dtype, attack_rng, teacher_input)

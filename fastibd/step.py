"""One optimization step of robust training: teacher forward, attack, student forward and
backward, optimizer. The trainer and the step benchmark run this same code."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastibd.loss import soft_labels
from fastibd.objective import AttackSettings, make_adversarial


@dataclass
class TrainingStep:
    """`step(x, y) -> (loss, parts)` on a batch already in the right device and layout.

    `objective` (a TrainingObjective, maybe compiled or DDP-wrapped) owns the student;
    `attack_model` is the student as the attack calls it (maybe compiled); `teacher` is
    None for modes without one; `distil_features` asks the teacher for its taps."""

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

    def autocast(self, device_type: str):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self.student.train()
        with self.autocast(x.device.type):
            teacher_probs = teacher_feats = None
            if self.teacher is not None:
                with torch.no_grad():
                    if self.distil_features:
                        teacher_logits, teacher_feats = self.teacher(x, features=True)
                    else:
                        teacher_logits = self.teacher(x)
                teacher_probs = soft_labels(teacher_logits, self.temperature)
            x_adv = make_adversarial(self.mode, self.attack_model, x, y, teacher_probs,
                                     self.attack, self.attack_rng)
            total, parts = self.objective(x, x_adv, y, teacher_probs, teacher_feats)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return total.detach(), parts

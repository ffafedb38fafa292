"""One optimization step of robust training: teacher forward, attack, student forward and
backward, optimizer. `build_step` makes it; the trainer and the step benchmark both call
it, so they run the same code."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastibd.device import Runtime
from fastibd.method.attacks import AttackSettings
from fastibd.method.awp import AWPSettings, WeightPerturbation
from fastibd.method.loss import FeatureDistillation, soft_labels
from fastibd.method.modes import MODES, LossSettings, Mode, TrainingObjective
from fastibd.models import TappedModel

Scheduler = torch.optim.lr_scheduler.LRScheduler


@dataclass
class TrainingStep:
    """`step(x, y) -> (loss, parts)` on a batch already in the right device and layout.

    `objective` is the TrainingObjective (student + feature head) the optimizer updates and
    a checkpoint saves; `forward` is what the step calls (it, maybe DDP-wrapped and
    compiled); `attack_model` is the student as the attack calls it (maybe compiled).
    `teacher` is None for modes without one. The teacher's taps (IBD) come from the
    natural batch (as the IBD code) or, with loss.teacher_input="adv", from the adversarial
    one (the paper's text); the soft labels always come from the natural batch."""

    objective: TrainingObjective
    forward: nn.Module
    attack_model: nn.Module
    teacher: nn.Module | None
    mode: Mode
    loss: LossSettings
    attack: AttackSettings
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: Scheduler | None
    dtype: torch.dtype
    attack_rng: torch.Generator | None
    awp: WeightPerturbation | None = None  # adversarial weight perturbation, if on

    @property
    def student(self) -> nn.Module:
        return self.objective.student

    def autocast(self, device_type: str):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        self.student.train()
        features = self.objective.features is not None
        # a mode that attacks nothing takes the taps on x, from the same teacher pass
        taps_from_adv = features and self.loss.teacher_input == "adv" and self.mode.attacks
        with self.autocast(x.device.type):
            teacher_probs = teacher_feats = None
            if self.teacher is not None:
                with torch.no_grad():
                    if features and not taps_from_adv:
                        teacher_logits, teacher_feats = self.teacher(x, features=True)
                    else:
                        teacher_logits = self.teacher(x)
                teacher_probs = soft_labels(teacher_logits, self.loss.temperature)
            x_adv = self.mode.adversarial(self.attack_model, x, y, teacher_probs, self.attack,
                                          self.attack_rng)
            if taps_from_adv:
                with torch.no_grad():
                    _, teacher_feats = self.teacher(x_adv, features=True)
            if self.awp is not None:  # the weights move to w + v for this batch's loss
                self.awp.perturb(x, x_adv, y, teacher_probs, teacher_feats)
            total, parts = self.forward(x, x_adv, y, teacher_probs, teacher_feats)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.awp is not None:  # ... and back to w exactly; the update uses their gradient
            self.awp.restore()
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


def build_step(student: TappedModel, teacher: TappedModel | None, loss: LossSettings,
               attack: AttackSettings, runtime: Runtime, *, resolution: int,
               make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
               make_scheduler: Callable[[torch.optim.Optimizer], Scheduler] | None = None,
               attack_rng: torch.Generator | None = None, ddp: bool = False,
               awp: AWPSettings | None = None) -> TrainingStep:
    """The step of `loss.mode` for `student` (and `teacher`), both already on the runtime's
    device and layout. Builds the feature head when the mode distils taps (sized at
    `resolution`), the objective, its optimizer and schedule; wraps the objective in DDP
    when `ddp` (gradients are then all-reduced by its backward), then compiles when the
    runtime says so. The attack calls its own compiled copy of the student, the teacher its
    own too: three graphs that each stay the same from step to step. `awp` with gamma > 0
    adds adversarial weight perturbation (fastibd.method.awp)."""
    mode = MODES[loss.mode]
    if mode.teacher and teacher is None:
        raise ValueError(f"loss.mode={loss.mode} distils from a teacher; none was given")
    features = None
    if mode.distils_features(loss):
        features = feature_distillation(teacher, student, resolution, loss.attention_dim,
                                        loss.backend).to(runtime.device)
    objective = TrainingObjective(student, loss, features)
    optimizer = make_optimizer(objective)
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
    forward: nn.Module = objective
    if ddp:
        # one process per GPU: DDP's replica lives on this process's device
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(objective, device_ids=device_ids)
    attack_model: nn.Module = student
    teacher_model = teacher if mode.teacher else None
    if runtime.compiled:
        forward = torch.compile(forward, mode=runtime.compile_mode)
        attack_model = torch.compile(student, mode=runtime.compile_mode)
        if teacher_model is not None:
            teacher_model = torch.compile(teacher_model, mode=runtime.compile_mode)
    perturbation = WeightPerturbation(objective, awp) if awp is not None and awp.gamma else None
    return TrainingStep(objective, forward, attack_model, teacher_model, mode, loss, attack,
                        optimizer, scaler, scheduler, runtime.dtype, attack_rng, perturbation)

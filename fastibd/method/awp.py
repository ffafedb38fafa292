"""Adversarial weight perturbation (AWP; Wu et al. 2020, "Adversarial Weight Perturbation
Helps Robust Generalization"), for any mode that trains on adversarial examples.

Each step, after the attack:
  1. a proxy copy of the objective (student and feature head, BN buffers included: its
     train-mode forward must not touch the student's BN statistics) computes the gradient
     g of the mode's own loss on this batch;
  2. every multi-dimensional weight w of the student (convolutions, linear layers: not BN
     affine parameters, not biases) is moved by v = gamma * ||w|| * g_w / ||g_w||: a
     perturbation of relative size gamma, layer by layer, up the loss.
     The AWP code (`calc_awp`, `diff_in_weights`) takes one plain SGD step of the proxy up
     the loss and normalizes each weight's change d = lr * g_w: the learning rate cancels,
     so the direction is the per-layer normalized gradient, as here;
  3. the step's loss and gradients are computed at w + v;
  4. the weights go back to w before the optimizer steps.

Two choices, as docs/method.md records:
  - Step 4 restores w exactly (a saved copy) and then lets the optimizer apply the
    gradient from w + v. The AWP code steps at w + v and subtracts v afterwards
    (`restore`): the same update up to float rounding, except that its weight decay sees
    w + v instead of w (a gamma * wd relative difference). Ours leaves the weights exactly
    "before + the optimizer's update", so resume stays bit-exact.
  - The perturbation ascends the mode's own objective (TRADES-AWP ascends TRADES, AT-AWP
    the CE of the adversarial batch, the same as pgd_at; for ibd the IBD loss with the
    feature head as it is, for rslad RSLAD's).

Under DDP each process perturbs with its own share of the batch; the weights are the same
again on every process after step 4, and the gradients are all-reduced as usual.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastibd.config import Integer, Number, option, section
from fastibd.errors import UserError
from fastibd.method.modes import MODES, TrainingObjective

EPS = 1e-20  # as the AWP code: the proxy may not move a layer at all


@section("awp", "Adversarial weight perturbation (Wu et al. 2020); off unless gamma > 0")
class AWPSettings:
    gamma: float = option(Number(0, 1), "relative size of the perturbation of each weight "
                          "(0: off; the AWP code: 5e-3 with TRADES, 1e-2 with PGD-AT)", 0.0)
    warmup: int = option(Integer(0), "epochs trained without it first (the AWP TRADES code: "
                         "10; its AT code: 0)", 0)


def perturbed_names(student: nn.Module) -> list[str]:
    """The student's parameters AWP moves: every multi-dimensional weight, as the AWP code's
    `diff_in_weights` selects them (by the state_dict key containing 'weight')."""
    return [name for name, p in student.named_parameters() if p.dim() > 1 and "weight" in name]


class WeightPerturbation:
    """`perturb(...)` before the step's forward, `restore()` after its backward, before the
    optimizer's step. `set_epoch` switches it on after the warm-up."""

    def __init__(self, objective: TrainingObjective, settings: AWPSettings) -> None:
        mode = objective.settings.mode
        if not MODES[mode].attacks:
            raise UserError(f"awp.gamma={settings.gamma}: AWP perturbs the weights against the "
                            f"adversarial loss, and loss.mode={mode} has no attack")
        self.objective, self.settings = objective, settings
        self.proxy = copy.deepcopy(objective)
        self.proxy.requires_grad_(False)
        self.proxy.student.requires_grad_(True)  # only the student is perturbed
        self.names = perturbed_names(objective.student)
        # The parameter objects stay the same for the run (load_state_dict copies in place):
        # looked up once, not per step.
        weights = dict(objective.student.named_parameters())
        proxies = dict(self.proxy.student.named_parameters())
        self.weights = [weights[name] for name in self.names]
        self.proxies = [proxies[name] for name in self.names]
        # Likewise the whole state (parameters and BN buffers), paired once: each step copies
        # the objective into the proxy tensor by tensor, with no state_dict to build.
        mine, theirs = objective.state_dict(keep_vars=True), self.proxy.state_dict(keep_vars=True)
        self.state_pairs = [(theirs[key], mine[key]) for key in mine]
        self.active = settings.warmup == 0
        self._saved = [torch.empty_like(w) for w in self.weights]  # reused every step
        self._moved = False

    def set_epoch(self, epoch: int) -> None:
        """Epochs count from 0: AWP runs from epoch `warmup` on (the AWP code's
        `epoch >= awp_warmup`, its epochs counting from 1 for TRADES: set warmup to match)."""
        self.active = epoch >= self.settings.warmup

    def direction(self, x: Tensor, x_adv: Tensor | None, y: Tensor,
                  teacher_probs: Tensor | None, teacher_feats: Sequence[Tensor] | None
                  ) -> dict[str, Tensor]:
        """{name: v} with ||v|| = gamma ||w|| for each perturbed weight w, along the gradient
        of this batch's loss."""
        with torch.no_grad():
            for proxy, own in self.state_pairs:
                proxy.copy_(own)
        self.proxy.train()
        loss = self.proxy(x, x_adv, y, teacher_probs, teacher_feats)[0]
        grads = torch.autograd.grad(loss, self.proxies, allow_unused=True)
        with torch.no_grad():
            directions = {}
            for name, w, g in zip(self.names, self.weights, grads, strict=True):
                if g is None:  # a layer the loss does not reach (e.g. an unused block)
                    continue
                directions[name] = self.settings.gamma * w.norm() / (g.norm() + EPS) * g
        return directions

    @torch.no_grad()
    def perturb(self, x: Tensor, x_adv: Tensor | None, y: Tensor,
                teacher_probs: Tensor | None, teacher_feats: Sequence[Tensor] | None) -> None:
        """Move the student's weights to w + v for this batch (no-op during the warm-up)."""
        if not self.active:
            return
        with torch.enable_grad():
            directions = self.direction(x, x_adv, y, teacher_probs, teacher_feats)
        for w, saved in zip(self.weights, self._saved, strict=True):
            saved.copy_(w)
        self._moved = True
        for name, w in zip(self.names, self.weights, strict=True):
            if name in directions:
                w.add_(directions[name])

    @torch.no_grad()
    def restore(self) -> None:
        """Put back exactly the weights `perturb` moved (their gradients stay)."""
        if not self._moved:
            return
        for w, saved in zip(self.weights, self._saved, strict=True):
            w.copy_(saved)
        self._moved = False

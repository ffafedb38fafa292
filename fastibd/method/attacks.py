"""Training-time Linf attacks: KL-PGD (IBD / RSLAD / TRADES), FGSM with random start
(Fast-IBD / Fast-AT) and cross-entropy PGD (adversarial training of teachers).

Every attack here
- measures eps in pixel space: x is an image batch in [0, 1] (models normalize inside);
- returns a detached x_adv with |x_adv - x| <= eps elementwise and 0 <= x_adv <= 1;
- runs the model in eval mode, so BatchNorm neither uses batch statistics nor updates its
  running averages on adversarial inputs, and restores every submodule's mode afterwards;
- differentiates with respect to the input only (torch.autograd.grad), so no gradient is
  accumulated into the model's parameters;
- computes the attack loss in fp32 from the logits, so it works under torch.autocast.

Attack losses use reduction="sum": a sample's gradient then does not depend on the batch
size and is not scaled down by 1/B before a low-precision backward (only its sign is used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastibd.config import Choice, Integer, Number, option, section

STARTS = ("normal", "uniform", "none")
NORMAL_START_STD = 0.001  # the TRADES / RSLAD / IBD code starts at x + 0.001 * N(0, 1)


@section("attack", "Training-time attack (pixel space, images in [0, 1])")
class AttackSettings:
    eps: float = option(Number(0, 1), "Linf budget", 8 / 255)
    step_size: float = option(Number(0, 1), "PGD step", 2 / 255)
    steps: int = option(Integer(1), "PGD steps (1: FGSM from a random start, Fast-IBD)", 10)
    start: str = option(Choice("normal", "uniform"), "start: x + 0.001 N(0,1) (authors' code) or "
                        "uniform in the ball", "normal")
    fgsm_alpha: float = option(Number(0, 10), "fast_at / single-step: step = alpha * eps", 1.25)
    eval_steps: int = option(Integer(1), "PGD steps for model selection on the held-out slice",
                             10)
    eval_step_size: float = option(Number(0, 1), "PGD step for model selection (0: eps/4)",
                                   0.0)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own mode afterwards (a model may
    deliberately mix modes, e.g. frozen BatchNorm inside a training network)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def check_budget(eps: float, step_size: float | None = None, *, positive: bool = False
                 ) -> None:
    """Reject budgets that cannot be meant: eps in [0, 1] (pixel space), a step >= 0; with
    `positive` (an evaluation, which must attack) both strictly above 0."""
    low = "(0" if positive else "[0"
    if not (0.0 < eps if positive else 0.0 <= eps) or eps > 1.0:
        raise ValueError(f"eps={eps} is outside {low}, 1]: eps is measured in pixel space on "
                         "[0, 1] images (write 8/255, not 8)")
    if step_size is not None and (step_size <= 0 if positive else step_size < 0):
        raise ValueError(f"the step size must be {'>' if positive else '>='} 0, got {step_size}")


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Closest point of (Linf eps-ball around x) ∩ [0, 1]^d, elementwise. x must be in [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def attack_start(
    x: Tensor, eps: float, kind: str = "uniform", generator: torch.Generator | None = None
) -> Tensor:
    """Starting point of an attack, projected into the ball and [0, 1]:
    "uniform": x + U(-eps, eps); "normal": x + 0.001 * N(0, 1); "none": x."""
    if kind not in STARTS:
        raise ValueError(f"unknown attack start {kind!r}; choose one of {STARTS}")
    if kind == "none":
        return x.clone()
    if kind == "normal":
        noise = NORMAL_START_STD * torch.randn(
            x.shape, generator=generator, device=x.device, dtype=x.dtype
        )
    else:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise = (2.0 * noise - 1.0) * eps
    return project(x + noise, x, eps)


def attack_loss(logits: Tensor, target: Tensor) -> Tensor:
    """The loss an attack ascends, in fp32, summed over the batch.

    target float [B, K]: probabilities -> kl_div(log_softmax(logits), target) (the KL of
    the RSLAD / IBD / TRADES code); target integer [B]: labels -> cross-entropy.
    """
    logits = logits.float()
    if target.is_floating_point():
        return F.kl_div(F.log_softmax(logits, dim=1), target.float(), reduction="sum")
    return F.cross_entropy(logits, target, reduction="sum")


def sign_ascent(
    model: nn.Module,
    x: Tensor,
    x_adv: Tensor,
    target: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    loss: Callable[[Tensor, Tensor], Tensor] | None = None,
    visit: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """The one PGD loop, for training and evaluation alike: `steps` signed-gradient steps of
    `loss(model(x_adv), target)` (a scalar; default `attack_loss`) from x_adv, each projected
    onto the eps-ball around x and [0, 1]. Gradients go to the input only. `visit(point,
    logits)` sees every point whose gradient is taken (steps 0 .. steps-1), e.g. to count
    what an evaluation attack broke. Returns the last point, detached."""
    loss = attack_loss if loss is None else loss
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():  # attacks are often called from no_grad code
            logits = model(x_adv)
            (grad,) = torch.autograd.grad(loss(logits, target), x_adv)
        if visit is not None:
            visit(x_adv.detach(), logits.detach())
        x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


@torch.no_grad()
def model_probs(model: nn.Module, x: Tensor) -> Tensor:
    """softmax(model(x)) in fp32 and eval mode: the TRADES attack target (the student's own
    clean prediction)."""
    with eval_mode(model):
        return F.softmax(model(x).float(), dim=1)


def kl_pgd(
    model: nn.Module,
    x: Tensor,
    target_probs: Tensor | None = None,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    start: str = "normal",
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD that maximizes kl_div(log_softmax(model(x_adv)), target_probs).

    x: [B, C, H, W] images in [0, 1]. target_probs: [B, K], the teacher's soft label
    (RSLAD / IBD), or None for TRADES: the model's own clean softmax (`model_probs`).
    start: "normal" (x + 0.001 N(0,1), the authors' code) or "uniform" (in the eps-ball).
    Returns x_adv, detached, same shape and dtype as x.
    """
    check_budget(eps, step_size)
    x = x.detach()
    if target_probs is None:
        target_probs = model_probs(model, x)
    target_probs = target_probs.detach()
    with eval_mode(model):
        x_adv = attack_start(x, eps, start, generator)
        return sign_ascent(model, x, x_adv, target_probs, eps, step_size, steps)


def fgsm_rs(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """FGSM with a uniform random start (Wong et al. 2020; Fast-IBD on ImageNet).

    Start uniformly in the eps-ball, take one signed step of `alpha` (default 1.25 * eps),
    project. target: [B, K] probabilities (KL to a teacher, Fast-IBD) or [B] integer labels
    (cross-entropy, Fast-AT). Returns x_adv, detached.
    """
    step = 1.25 * eps if alpha is None else alpha
    check_budget(eps, step)
    x = x.detach()
    with eval_mode(model):
        x_adv = attack_start(x, eps, "uniform", generator)
        return sign_ascent(model, x, x_adv, target.detach(), eps, step, steps=1)


def pgd_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Cross-entropy PGD (Madry et al. 2018), for adversarially training teachers.

    x: [B, C, H, W] in [0, 1]; y: [B] labels. random_start: uniform start in the eps-ball.
    Returns x_adv, detached.
    """
    check_budget(eps, step_size)
    x = x.detach()
    with eval_mode(model):
        x_adv = attack_start(x, eps, "uniform" if random_start else "none", generator)
        return sign_ascent(model, x, x_adv, y.detach(), eps, step_size, steps)


def kl_attack(model: nn.Module, x: Tensor, target_probs: Tensor, settings: AttackSettings,
              generator: torch.Generator | None) -> Tensor:
    """The KL attack of IBD, RSLAD and TRADES as `settings` asks: KL-PGD, or with one step
    FGSM from a uniform start with a step of fgsm_alpha * eps (Fast-IBD)."""
    if settings.steps == 1:
        return fgsm_rs(model, x, target_probs, settings.eps, settings.fgsm_alpha * settings.eps,
                       generator)
    return kl_pgd(model, x, target_probs, settings.eps, settings.step_size, settings.steps,
                  settings.start, generator)


def ce_attack(model: nn.Module, x: Tensor, y: Tensor, settings: AttackSettings,
              generator: torch.Generator | None, single_step: bool = False) -> Tensor:
    """Cross-entropy attack of adversarial training: PGD from a uniform start, or (one step,
    or `single_step`: Fast-AT) FGSM from a uniform start with a step of fgsm_alpha * eps."""
    if single_step or settings.steps == 1:
        return fgsm_rs(model, x, y, settings.eps, settings.fgsm_alpha * settings.eps, generator)
    return pgd_ce(model, x, y, settings.eps, settings.step_size, settings.steps, True, generator)


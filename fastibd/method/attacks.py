"""Training-time attacks: KL-PGD (IBD / RSLAD / TRADES), FGSM with random start
(Fast-IBD / Fast-AT) and cross-entropy PGD (adversarial training of teachers), in the Linf
threat model (the default) or the L2 one (`norm="l2"`: PGD-L2, FGM).

Every attack here
- measures eps in pixel space: x is an image batch in [0, 1] (models normalize inside);
- returns a detached x_adv with |x_adv - x| <= eps elementwise (Linf) or
  ||x_adv - x||_2 <= eps per example (L2), and 0 <= x_adv <= 1;
- runs the model in eval mode, so BatchNorm neither uses batch statistics nor updates its
  running averages on adversarial inputs, and restores every submodule's mode afterwards
  (`batchnorm="train"`: in the model's own modes instead, as the PGD-AT code of Rice et
  al. / AT-AWP and Fast-AT's code attack their training model);
- differentiates with respect to the input only (torch.autograd.grad), so no gradient is
  accumulated into the model's parameters;
- computes the attack loss in fp32 from the logits, so it works under torch.autocast.

Attack losses use reduction="sum": a sample's gradient then does not depend on the batch
size and is not scaled down by 1/B before a low-precision backward (only its sign, or for L2
its direction, is used).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastibd.config import Choice, Integer, Number, option, section
from fastibd.errors import UserError

STARTS = ("normal", "uniform", "none")
NORMS = ("linf", "l2")
BATCHNORM_MODES = ("eval", "train")  # the model's modes during a training attack
NORMAL_START_STD = 0.001  # the TRADES / RSLAD / IBD code starts at x + 0.001 * N(0, 1)
TINY_NORM = 1e-12  # a zero gradient gives a zero L2 step (as F.normalize), not NaN


@section("attack", "Training-time attack (pixel space, images in [0, 1])")
class AttackSettings:
    # L2 budgets may exceed 1 (ImageNet's L2 eps 3.0), so the bound on the three budgets is
    # checked per norm in __post_init__, not by the option
    eps: float = option(Number(0), "budget (Linf: at most 1, e.g. 8/255; L2: e.g. 0.5)", 8 / 255)
    step_size: float = option(Number(0), "PGD step (L2: the step's L2 length)", 2 / 255)
    steps: int = option(Integer(1), "PGD steps (1: FGSM from a random start, Fast-IBD)", 10)
    start: str = option(Choice("normal", "uniform"), "start: x + 0.001 N(0,1) (authors' code) or "
                        "uniform in the ball", "normal")
    fgsm_alpha: float = option(Number(0, 10), "fast_at / single-step: step = alpha * eps", 1.25)
    eval_steps: int = option(Integer(1), "PGD steps for model selection on the held-out slice",
                             10)
    eval_step_size: float = option(Number(0), "PGD step for model selection (0: eps/4)", 0.0)
    norm: str = option(Choice(*NORMS), "threat model: linf (sign steps, box) or l2 (normalized "
                       "gradient steps, L2 ball)", "linf")
    batchnorm: str = option(Choice(*BATCHNORM_MODES), "the student's mode while it is attacked: "
                            "eval (running statistics, left alone; the IBD, RSLAD and TRADES "
                            "codes) or train (batch statistics, running ones updated at every "
                            "step; the PGD-AT code of Rice et al. / AT-AWP, Fast-AT's code)",
                            "eval")

    def __post_init__(self) -> None:
        if self.norm != "linf":
            return
        for key in ("eps", "step_size", "eval_step_size"):
            if getattr(self, key) > 1.0:
                raise UserError(f"attack.{key}={getattr(self, key)} is above 1: a Linf budget "
                                "is in pixel space on [0, 1] images (write 8/255, not 8); "
                                "only attack.norm=l2 takes budgets above 1")


def attack_mode(model: nn.Module, batchnorm: str) -> AbstractContextManager:
    """The context an attack runs the model in: eval_mode, or with batchnorm="train" the
    model's own modes (a training student's: BatchNorm on batch statistics)."""
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    return eval_mode(model) if batchnorm == "eval" else nullcontext()


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


def check_budget(eps: float, step_size: float | None = None, *, positive: bool = False,
                 norm: str = "linf") -> None:
    """Reject budgets that cannot be meant: eps in [0, 1] (Linf, pixel space) or finite and
    >= 0 (L2: the L2 ball of radius sqrt(d) already holds all of [0, 1]^d, so an eps above 1,
    as ImageNet's 3.0, is meaningful), a step >= 0; with `positive` (an evaluation, which must
    attack) both strictly above 0."""
    check_norm(norm)
    low = "(0" if positive else "[0"
    too_large = eps > 1.0 if norm == "linf" else not math.isfinite(eps)
    if not (0.0 < eps if positive else 0.0 <= eps) or too_large:
        if norm == "linf":
            raise ValueError(f"eps={eps} is outside {low}, 1]: eps is measured in pixel space "
                             "on [0, 1] images (write 8/255, not 8)")
        raise ValueError(f"eps={eps} is outside {low}, inf): an L2 budget is a finite radius "
                         "in pixel space on [0, 1] images")
    if step_size is not None and (step_size <= 0 if positive else step_size < 0):
        raise ValueError(f"the step size must be {'>' if positive else '>='} 0, got {step_size}")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown threat model {norm!r}; choose one of {NORMS}")


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """Linf: the closest point of (eps-ball around x) ∩ [0, 1]^d, elementwise. L2: x_adv - x
    scaled per example into the L2 eps-ball, then clipped to [0, 1] (the order of the AT-AWP
    / Rice et al. code; not the exact projection onto the intersection, but inside it: with x
    in [0, 1] the clip only moves a pixel towards x). x must be in [0, 1]."""
    if norm == "l2":
        delta = x_adv - x
        factor = (eps / _norms(delta).clamp_min(TINY_NORM)).clamp(max=1.0)
        return (x + delta * factor).clamp(0.0, 1.0)
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def _norms(t: Tensor) -> Tensor:
    """Per-example L2 norms of t [B, ...] in fp32, shaped [B, 1, ..., 1] to broadcast."""
    return t.flatten(1).float().norm(dim=1).view(-1, *[1] * (t.dim() - 1)).to(t.dtype)


def ascent_direction(grad: Tensor, norm: str = "linf") -> Tensor:
    """The unit step of steepest ascent for the norm: sign(grad) (Linf), grad / ||grad||_2
    per example (L2; a zero gradient gives a zero step)."""
    if norm == "l2":
        return grad / _norms(grad).clamp_min(TINY_NORM)
    return grad.sign()


def attack_start(
    x: Tensor, eps: float, kind: str = "uniform", generator: torch.Generator | None = None,
    norm: str = "linf",
) -> Tensor:
    """Starting point of an attack, projected into the ball and [0, 1]:
    "uniform": Linf x + U(-eps, eps) elementwise; L2 x + r u, u a uniformly random direction
    (a normalized N(0, I)) and r ~ U(0, eps) per example (the AT-AWP / Rice et al. code's L2
    start; denser near x than uniform in the ball's volume); "normal": x + 0.001 * N(0, 1)
    for both norms (the TRADES code's start, its L2 branch too); "none": x."""
    if kind not in STARTS:
        raise ValueError(f"unknown attack start {kind!r}; choose one of {STARTS}")
    if kind == "none":
        return x.clone()
    if kind == "normal":
        noise = NORMAL_START_STD * torch.randn(
            x.shape, generator=generator, device=x.device, dtype=x.dtype
        )
    elif norm == "l2":
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        radius = eps * torch.rand((len(x), *[1] * (x.dim() - 1)), generator=generator,
                                  device=x.device, dtype=x.dtype)
        noise = radius * ascent_direction(direction, "l2")
    else:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise = (2.0 * noise - 1.0) * eps
    return project(x + noise, x, eps, norm)


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
    norm: str = "linf",
) -> Tensor:
    """The one PGD loop, for training and evaluation alike: `steps` steps of `step_size`
    along `ascent_direction` (Linf: the gradient's sign; L2: the gradient normalized per
    example) of `loss(model(x_adv), target)` (a scalar; default `attack_loss`) from x_adv,
    each projected onto the eps-ball of `norm` around x and [0, 1]. Gradients go to the input
    only. `visit(point,
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
        x_adv = project(x_adv.detach() + step_size * ascent_direction(grad, norm), x, eps,
                        norm)
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
    norm: str = "linf",
    batchnorm: str = "eval",
) -> Tensor:
    """PGD that maximizes kl_div(log_softmax(model(x_adv)), target_probs), in `norm`'s ball.

    x: [B, C, H, W] images in [0, 1]. target_probs: [B, K], the teacher's soft label
    (RSLAD / IBD), or None for TRADES: the model's own clean softmax (`model_probs`).
    start: "normal" (x + 0.001 N(0,1), the authors' code) or "uniform" (in the eps-ball).
    batchnorm: see `attack_mode`. Returns x_adv, detached, same shape and dtype as x.
    """
    check_budget(eps, step_size, norm=norm)
    x = x.detach()
    if target_probs is None:
        target_probs = model_probs(model, x)
    target_probs = target_probs.detach()
    with attack_mode(model, batchnorm):
        x_adv = attack_start(x, eps, start, generator, norm)
        return sign_ascent(model, x, x_adv, target_probs, eps, step_size, steps, norm=norm)


def fgsm_rs(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    eps: float,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
    norm: str = "linf",
    batchnorm: str = "eval",
) -> Tensor:
    """FGSM with a uniform random start (Wong et al. 2020; Fast-IBD on ImageNet); with
    norm="l2" its L2 form, FGM (one normalized-gradient step) from the L2 random start.

    Start at random in the eps-ball, take one step of `alpha` (default 1.25 * eps), project.
    target: [B, K] probabilities (KL to a teacher, Fast-IBD) or [B] integer labels
    (cross-entropy, Fast-AT). batchnorm: see `attack_mode`. Returns x_adv, detached.
    """
    step = 1.25 * eps if alpha is None else alpha
    check_budget(eps, step, norm=norm)
    x = x.detach()
    with attack_mode(model, batchnorm):
        x_adv = attack_start(x, eps, "uniform", generator, norm)
        return sign_ascent(model, x, x_adv, target.detach(), eps, step, steps=1, norm=norm)


def pgd_ce(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    norm: str = "linf",
    batchnorm: str = "eval",
) -> Tensor:
    """Cross-entropy PGD (Madry et al. 2018), for adversarially training teachers; PGD-L2
    with norm="l2".

    x: [B, C, H, W] in [0, 1]; y: [B] labels. random_start: uniform start in the eps-ball.
    batchnorm: see `attack_mode`. Returns x_adv, detached.
    """
    check_budget(eps, step_size, norm=norm)
    x = x.detach()
    with attack_mode(model, batchnorm):
        x_adv = attack_start(x, eps, "uniform" if random_start else "none", generator, norm)
        return sign_ascent(model, x, x_adv, y.detach(), eps, step_size, steps, norm=norm)


def kl_attack(model: nn.Module, x: Tensor, target_probs: Tensor, settings: AttackSettings,
              generator: torch.Generator | None) -> Tensor:
    """The KL attack of IBD, RSLAD and TRADES as `settings` asks: KL-PGD, or with one step
    FGSM (L2: FGM) from a uniform start with a step of fgsm_alpha * eps (Fast-IBD)."""
    if settings.steps == 1:
        return fgsm_rs(model, x, target_probs, settings.eps, settings.fgsm_alpha * settings.eps,
                       generator, settings.norm, settings.batchnorm)
    return kl_pgd(model, x, target_probs, settings.eps, settings.step_size, settings.steps,
                  settings.start, generator, settings.norm, settings.batchnorm)


def ce_attack(model: nn.Module, x: Tensor, y: Tensor, settings: AttackSettings,
              generator: torch.Generator | None, single_step: bool = False) -> Tensor:
    """Cross-entropy attack of adversarial training: PGD from a uniform start, or (one step,
    or `single_step`: Fast-AT) FGSM (L2: FGM) from a uniform start with a step of
    fgsm_alpha * eps."""
    if single_step or settings.steps == 1:
        return fgsm_rs(model, x, y, settings.eps, settings.fgsm_alpha * settings.eps, generator,
                       settings.norm, settings.batchnorm)
    return pgd_ce(model, x, y, settings.eps, settings.step_size, settings.steps, True, generator,
                  settings.norm, settings.batchnorm)


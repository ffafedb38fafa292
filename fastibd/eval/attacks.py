"""Evaluation-time attacks: FGSM, PGD-k (cross-entropy) and CW-inf-k (margin loss) with
restarts, AutoAttack / APGD / Square through pyautoattack, and two black-box ones: SPSA
(gradient-free, from the model's logits only) and transfer (examples crafted on another model).
All but SPSA also run in the L2 threat model (`norm="l2"`): FGM, PGD-L2, CW-L2 (PGD-L2 on the
margin), AutoAttack and Square with pyautoattack's norm "L2".

fastibd.method.attacks makes training examples; the attacks here answer, for every example, "is it
still classified correctly under this attack?". Conventions (docs/method.md):
- eps is in pixel space, images in [0, 1] (models normalize inside); an Linf budget per
  pixel, an L2 budget per example;
- the model runs in eval mode (restored afterwards), gradients only to the input;
- attack losses in fp32 from the logits.

Bookkeeping. An example counts as broken as soon as any point the attack visited is
misclassified: the clean image, the random start, every iterate of every restart. Each of
those points lies in the eps-ball, so each is a valid adversarial example, and looking at them
costs nothing (the logits are computed for the gradient anyway). Two consequences the sanity
checks of fastibd.evaluate rely on: no attack reports a higher accuracy than clean, and
PGD-k with more steps is never weaker than with fewer steps from the same random starts (the
starts depend only on the seed and the restart index, not on the number of steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastibd.method.attacks import attack_start, check_budget, eval_mode, project, sign_ascent
from fastibd.seeding import derived_seed

LOSSES = ("ce", "cw")
AUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}  # fastibd's name -> pyautoattack's
AUTOATTACK_NAMES = ("aa", "aa-apgd", "square")
AA_TARGET_CLASSES = 9  # AutoAttack standard: APGD-T and FAB-T try the 9 most likely targets
SQUARE_QUERIES = 5000  # AutoAttack standard
# SPSA as in Uesato et al. 2018 and the IBD paper's Table 3: 128 random directions per
# iteration (each queried at +delta and -delta), delta 0.01, 10 iterations, Adam with lr 0.01.
SPSA_SAMPLES, SPSA_DELTA, SPSA_ITERS, SPSA_LR = 128, 0.01, 10, 0.01
SPSA_BATCH = 16384  # model inputs per SPSA forward pass (fewer after CUDA runs out of memory)
SPSA_STREAM = 0x5B5A  # SPSA's own random stream, apart from the PGD restarts' (derived_seed)


@dataclass
class AttackResult:
    """What an attack found, per example.

    x_adv: [B, C, H, W] a misclassified point of the eps-ball where one was found, else the
    last point visited. correct: bool [B], still classified correctly. correct_by_step: bool
    [steps + 1, B] for PGD-type attacks: row k says "correct under the first k steps" (of
    every restart; row 0 is clean + random start), so one long run gives every shorter one.
    finals: for FGSM / PGD / CW, the last point of each restart after all its steps (what a
    transfer attack sends on to the evaluated model).
    """

    x_adv: Tensor
    correct: Tensor
    correct_by_step: Tensor | None = None
    finals: tuple[Tensor, ...] = ()


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example CW margin max_{j != y} z_j - z_y in fp32 (positive = misclassified).

    The Linf "CW" of robustness papers (TRADES, RSLAD, IBD): PGD on this margin. It is not
    torchattacks' CW, which is the L2 Carlini-Wagner optimisation."""
    logits = logits.float()
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy in fp32."""
    return F.cross_entropy(logits.float(), y, reduction="none")


LOSS_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ce": ce_loss, "cw": margin_loss}


def restart_generator(seed: int, restart: int, device: torch.device) -> torch.Generator:
    """The random-start generator of one restart: the same for every PGD/CW attack of a run, so
    a longer attack starts where the shorter one did."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + restart)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Predicted classes [B] in eval mode."""
    with eval_mode(model):
        return model(x).argmax(dim=1)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float = 2 / 255,
    steps: int = 20,
    loss: str = "ce",
    restarts: int = 1,
    random_start: bool = True,
    seed: int = 0,
    norm: str = "linf",
) -> AttackResult:
    """PGD ascending `loss` ("ce": cross-entropy, PGD-k; "cw": CW margin, CW-inf-k), in the
    Linf ball (signed steps) or with norm="l2" the L2 ball (normalized-gradient steps:
    PGD-L2, CW-L2).

    x: [B, C, H, W] in [0, 1]; y: [B] labels. Each restart starts at random in the eps-ball
    (`attack_start`'s "uniform"; or at x without random_start) and takes `steps` steps of
    `step_size`, projected onto the ball and [0, 1]. An example is broken if any restart
    breaks it at any step.
    """
    check_budget(eps, step_size, positive=True, norm=norm)
    if loss not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {LOSSES}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
    loss_fn = LOSS_FUNCTIONS[loss]
    x, y = x.detach(), y.detach()
    finals = []
    with eval_mode(model):
        tally = _Tally(x, y, predict(model, x) == y, steps)
        for restart in range(restarts):
            generator = restart_generator(seed, restart, x.device)
            x_adv = attack_start(x, eps, "uniform" if random_start else "none", generator,
                                 norm)
            tally.new_restart()
            x_adv = sign_ascent(model, x, x_adv, y, eps, step_size, steps,
                                lambda logits, labels: loss_fn(logits, labels).sum(),
                                tally.visit, norm)
            with torch.no_grad():
                tally.visit(x_adv, model(x_adv))  # the last point: no gradient needed
            tally.keep_unbroken(x_adv)
            finals.append(x_adv)
    return AttackResult(tally.best, tally.correct, tally.by_step, tuple(finals))


class _Tally:
    """What the points a PGD attack visits have broken, example by example."""

    def __init__(self, x: Tensor, y: Tensor, correct: Tensor, steps: int) -> None:
        self.y, self.correct = y, correct
        self.by_step = correct.expand(steps + 1, -1).clone()
        self.best = x.clone()

    def new_restart(self) -> None:
        self.alive = torch.ones_like(self.correct)  # not yet broken in this restart
        self.step = 0

    def visit(self, point: Tensor, logits: Tensor) -> None:
        wrong = logits.argmax(dim=1) != self.y
        newly = wrong & self.correct
        self.best[newly] = point[newly]
        self.correct &= ~wrong
        self.alive &= ~wrong
        self.by_step[self.step] &= self.alive
        self.step += 1

    def keep_unbroken(self, last: Tensor) -> None:
        self.best[self.correct] = last[self.correct]  # unbroken: the last point visited


def zero_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """bool [B]: where the cross-entropy's input gradient at x is exactly zero (eval mode).
    Sign-gradient attacks (FGSM, PGD, APGD) cannot move such an example at all: a softmax
    saturated to exactly 1 in fp32, or a step function on the input (quantisation), does
    that, and it looks like robustness."""
    x = x.detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        (grad,) = torch.autograd.grad(ce_loss(model(x), y).sum(), x)
    return grad.flatten(1).abs().amax(dim=1) == 0


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf"
         ) -> AttackResult:
    """FGSM (Goodfellow et al.): one signed cross-entropy step of size eps from x itself; with
    norm="l2" FGM, one step of L2 length eps along the normalized gradient."""
    return pgd(model, x, y, eps, step_size=eps, steps=1, loss="ce", random_start=False,
               norm=norm)


# ------------------------------------------------------------------------- black-box


def transfer(model: nn.Module, x: Tensor, y: Tensor, crafted: Sequence[Tensor]) -> AttackResult:
    """Score examples crafted on another model (a surrogate) on `model`.

    `crafted`: the surrogate attack's final points, one tensor per restart, each after all
    its steps, as TRADES's `_pgd_blackbox` scores them (not the first point that fooled the
    surrogate: that is often an early iterate, or the clean image itself where the surrogate
    errs, and transfers worse). correct: `model` classifies the clean x and every crafted
    point correctly; the clean image counts, as in every attack here, so a transfer attack
    never scores above clean. x_adv: the first crafted point `model` misclassifies, x where
    only the clean image is, else the last crafted point."""
    if not crafted:
        raise ValueError("transfer needs at least one crafted point per example")
    x = x.detach()
    correct = predict(model, x) == y
    x_adv = x.clone()
    for point in crafted:
        point = point.detach()
        fooled = correct & (predict(model, point) != y)
        x_adv[fooled] = point[fooled]
        correct &= ~fooled
    x_adv[correct] = crafted[-1].detach()[correct]
    return AttackResult(x_adv, correct)


def spsa_generator(seed: int, device: torch.device) -> torch.Generator:
    """SPSA's random start and directions: its own stream, reproducible from the seed."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, SPSA_STREAM))


def spsa(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    samples: int = SPSA_SAMPLES,
    delta: float = SPSA_DELTA,
    iters: int = SPSA_ITERS,
    lr: float = SPSA_LR,
    seed: int = 0,
    max_batch: int = SPSA_BATCH,
) -> AttackResult:
    """Linf SPSA (Uesato et al. 2018, "Adversarial Risk and the Dangers of Evaluating Against
    Weak Attacks"): a gradient-free attack that sees only the logits.

    Follows cleverhans' `spsa` (torch and TF versions) and advertorch's / torchattacks'
    `LinfSPSAAttack`: a uniform random start in the eps-ball (cleverhans), then `iters`
    iterations of Adam (lr `lr`) ascending the CW margin along the SPSA estimate of its
    gradient (`spsa_gradient`: `samples` Rademacher directions, each queried at +-delta, so
    2 * samples queries per example and iteration), each iterate projected onto the eps-ball
    and [0, 1]. Every example of the batch is attacked at once (Adam is elementwise, so this is
    the per-example attack of the references); the queries of all of them go through the model
    together, `max_batch` inputs per forward pass at most (halved when CUDA runs out of
    memory). Bookkeeping as PGD's: broken if the clean image, the start or any iterate is
    misclassified; correct_by_step row k: correct under the first k iterations. The start and
    directions come from `spsa_generator(seed)`, one direction for every example per draw, so
    that they do not depend on `max_batch`.
    """
    check_budget(eps, positive=True)
    if samples < 1 or iters < 1 or max_batch < 1:
        raise ValueError(f"samples, iters and max_batch must be >= 1, got {samples}, {iters}, "
                         f"{max_batch}")
    if delta <= 0 or lr <= 0:
        raise ValueError(f"delta and lr must be > 0, got {delta}, {lr}")
    x, y = x.detach(), y.detach()
    generator = spsa_generator(seed, x.device)
    pieces = _Pieces(max_batch, len(x), samples)
    with eval_mode(model), torch.no_grad():
        tally = _Tally(x, y, predict(model, x) == y, iters)
        tally.new_restart()
        x_adv = attack_start(x, eps, "uniform", generator)
        perturbation = x_adv - x  # what Adam moves (the references' parameter)
        optimizer = torch.optim.Adam([perturbation], lr=lr)
        tally.visit(x_adv, model(x_adv))
        for _ in range(iters):
            # Adam descends: give it the estimated gradient of the negated margin
            perturbation.grad = -spsa_gradient(model, x_adv, y, samples, delta, generator,
                                               pieces)
            optimizer.step()
            x_adv = project(x + perturbation, x, eps)
            perturbation.copy_(x_adv - x)
            tally.visit(x_adv, model(x_adv))
        tally.keep_unbroken(x_adv)
    return AttackResult(tally.best, tally.correct, tally.by_step)


def spsa_gradient(model: nn.Module, x: Tensor, y: Tensor, samples: int, delta: float,
                  generator: torch.Generator, pieces: _Pieces | None = None) -> Tensor:
    """SPSA estimate of the gradient of the CW margin at x [B, C, H, W], per example: the mean
    over `samples` directions v in {-1, +1}^d of (m(x + delta v) - m(x - delta v)) / (2 delta) v.
    The queries are not clipped to [0, 1], as in the references (clipping would bias the
    estimate at saturated pixels); only the iterates must be valid images."""
    if pieces is None:
        pieces = _Pieces(SPSA_BATCH, len(x), samples)
    total, drawn = torch.zeros_like(x, dtype=torch.float32), 0
    while drawn < samples:
        # one direction for each example per draw: the stream does not depend on the grouping
        v = torch.stack([_rademacher(x, generator) for _ in range(min(pieces.samples,
                                                                       samples - drawn))])
        drawn += len(v)
        slopes = pieces.map(lambda part: _margin_slopes(model, x, y, part, delta), v)
        total += torch.einsum("kb,kb...->b...", slopes, v.float())
    return (total / samples).to(x.dtype)


def _rademacher(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random signs of x's shape, dtype and device."""
    bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return 2 * bits - 1


def _margin_slopes(model: nn.Module, x: Tensor, y: Tensor, v: Tensor, delta: float) -> Tensor:
    """[k, B]: (m(x + delta v_i) - m(x - delta v_i)) / (2 delta) for directions v [k, B, ...],
    all 2 k B queries in one forward pass."""
    k = len(v)
    queries = torch.cat([x + delta * v, x - delta * v]).flatten(0, 1)
    margins = margin_loss(model(queries), y.repeat(2 * k)).view(2, k, len(x))
    return (margins[0] - margins[1]) / (2 * delta)


class _Pieces:
    """How many SPSA directions (each one query pair per example) go into one forward pass:
    all `samples` where `max_batch` model inputs allow, halved each time CUDA runs out of
    memory."""

    def __init__(self, max_batch: int, batch: int, samples: int) -> None:
        self.samples = max(1, min(samples, max_batch // (2 * batch)))

    def map(self, fn: Callable[[Tensor], Tensor], v: Tensor) -> Tensor:
        """torch.cat of fn over v's directions, self.samples of them at a time."""
        while True:
            try:
                return torch.cat([fn(part) for part in v.split(self.samples)])
            except torch.OutOfMemoryError:
                if self.samples == 1:
                    raise
            # out of the except block, so that the failed attempt's tensors are freed
            self.samples //= 2
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------- pyautoattack


class _Collect(logging.Handler):
    """Keeps pyautoattack's warnings (printed once by the caller instead of once per batch)."""

    def __init__(self, sink: set[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.add(record.getMessage().strip())


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: pyautoattack calls .view() on
    input gradients, which fails on the channels_last gradients our models produce."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _PlainLayout(nn.Module):
    """The model as pyautoattack needs it: NCHW-contiguous input gradients, fp32 logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_ContiguousGrad.apply(x)).float()


@contextmanager
def collect_autoattack_warnings(sink: set[str]) -> Iterator[None]:
    logger = logging.getLogger("auto-attack")
    handler = _Collect(sink)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    name: str = "aa",
    seed: int = 0,
    num_classes: int | None = None,
    square_queries: int = SQUARE_QUERIES,
    warnings: set[str] | None = None,
    norm: str = "linf",
) -> AttackResult:
    """Run pyautoattack on one batch, in its "Linf" or (norm="l2") "L2" threat model.

    name: "aa" = AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000 queries);
    "aa-apgd" = its two gradient attacks only (APGD-CE + APGD-T, as configured in standard:
    one restart, 9 target classes); "square" = the black-box Square attack alone.
    With 4 to 9 classes the targeted attacks use every other class as a target (below 4,
    APGD-T's DLR loss is undefined: robustness.check_classes_supported refuses it).
    `warnings` receives pyautoattack's warning messages (randomness, output range, ...).
    """
    from pyautoattack import AutoAttack

    check_budget(eps, positive=True, norm=norm)
    if name not in AUTOATTACK_NAMES:
        raise ValueError(f"unknown pyautoattack attack {name!r}; choose one of "
                         f"{AUTOATTACK_NAMES}")
    x, y = x.detach().contiguous(), y.detach()  # pyautoattack .view()s its tensors
    wrapped = _PlainLayout(model)
    with eval_mode(model):
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(model(x[:1]).shape[1])
        kwargs = {"norm": AUTOATTACK_NORMS[norm], "eps": eps, "device": x.device, "seed": seed}
        if name == "aa":
            adversary = AutoAttack(wrapped, version="standard", **kwargs)
        else:
            chosen = ["apgd-ce", "apgd-t"] if name == "aa-apgd" else ["square"]
            adversary = AutoAttack(wrapped, version="custom", attacks=chosen, **kwargs)
            adversary.apgd.n_restarts = 1  # the custom version's default is 5; standard uses 1
        targets = max(1, min(AA_TARGET_CLASSES, num_classes - 1))
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
        adversary.square.n_queries = square_queries
        with collect_autoattack_warnings(warnings if warnings is not None else set()):
            x_adv, y_pred = adversary.run_standard_evaluation(x, y, batch_size=len(x))
    return AttackResult(x_adv.detach(), y_pred == y)

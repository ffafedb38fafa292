"""Robust accuracy, example by example: run a list of attacks (clean, FGSM, PGD-k, CW-k,
AutoAttack and its parts, and the black-box SPSA, Square and transfer from a surrogate model)
over batches, and the checks that flag gradient masking.
`fastibd.evaluate` reports with it; the trainer picks its best checkpoint with the same
PGD (fastibd.train.trainer)."""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastibd.chance import chance_bound, sign_test
from fastibd.cli import comma_list
from fastibd.device import synchronize
from fastibd.eval import attacks as eval_attacks
from fastibd.seeding import derived_seed

ATTACK_NAME = re.compile(
    r"^(clean|fgsm|aa|aa-apgd|square|spsa|transfer-fgsm|(pgd|cw|transfer-pgd)([1-9]\d*))$")
ATTACK_HELP = ("clean, fgsm, pgdK (PGD-K, cross-entropy), cwK (PGD-K on the CW margin), aa "
               "(AutoAttack standard), aa-apgd (APGD-CE + APGD-T), and black-box: square, spsa, "
               "transfer-fgsm, transfer-pgdK (FGSM / PGD-K crafted on --surrogate)")
WHITE_BOX = ("fgsm", "pgd", "cw", "aa-apgd")
TRANSFER = "transfer-"  # transfer-NAME: the white-box NAME run on a surrogate model
BLACK_BOX = ("square", "spsa", "transfer-fgsm", "transfer-pgd")  # compared with WHITE_BOX
CE_ATTACKS = ("fgsm", "pgd")  # follow the cross-entropy's gradient
MARGIN_ATTACKS = ("cw", "aa-apgd", "aa")  # margin losses (CW, APGD-DLR/T), or AutoAttack
HUGE_EPS, HUGE_STEPS, HUGE_STEP_SIZE = 0.5, 20, 0.05
HUGE_EPS_MAX_ACCURACY = 0.02  # anything clearly above 0% at eps 0.5 means the gradients lie
MONOTONIC_FALSE_ALARM = 1e-3  # how often equally strong attacks may set off the monotonic flag
LINF_ONLY = ("spsa",)  # attacks with no L2 form here
AUTOATTACK_TARGETED = ("aa", "aa-apgd")  # run APGD-T
AA_MIN_CLASSES = 4  # APGD-T's targeted DLR loss reads the 3rd and 4th largest logits
# Masking checks. Each threshold leaves room for what honest models show: AutoAttack or CW
# typically 1-5 points below PGD-20 (TRADES, RSLAD, IBD; the digits student: 0), never an
# exactly-zero cross-entropy gradient (that needs an fp32 logit margin above ~100).
CHANGED_NOTHING = 0.01  # CE attacks broke < 1% of the correctly classified examples ...
CHANGED_MORE = 0.05  # ... while a margin-based attack broke >= 5 points more of them
MARGIN_GAP, MARGIN_GAP_RELATIVE = 0.05, 0.10  # margin-based accuracy this far below CE-PGD's
GAP_MIN_STEPS = 10  # only PGD with >= 10 steps is compared with the margin attacks
ZERO_GRADIENT_SHARE = 0.05  # exactly-zero CE gradients on >= 5% of the examples
RECORDED_FRACTION = 0.5  # clean accuracy below half of what the checkpoint recorded


def parse_attacks(text: str) -> list[str]:
    """Comma-separated attack names, validated, duplicates dropped, order kept."""
    names = []
    for raw in comma_list(text):
        if not ATTACK_NAME.match(raw.lower()):
            raise argparse.ArgumentTypeError(f"unknown attack {raw!r}; use {ATTACK_HELP}")
        names.append(raw.lower())
    if not names:
        raise argparse.ArgumentTypeError(f"no attack given; use {ATTACK_HELP}")
    return list(dict.fromkeys(names))


def attack_family(name: str) -> tuple[str, int]:
    """('pgd', 20) for 'pgd20', ('cw', 100) for 'cw100', ('transfer-pgd', 100) for
    'transfer-pgd100', (name, 0) for the others."""
    match = ATTACK_NAME.match(name)
    if match is None:
        raise ValueError(f"unknown attack {name!r}")
    if match.group(2):
        return match.group(2), int(match.group(3))
    return name, 0


def needs_surrogate(name: str) -> bool:
    """Whether `name` crafts its examples on a surrogate model (a transfer attack)."""
    return name.startswith(TRANSFER)


def over_255(value: float) -> str:
    """8/255 for 0.0313725..., the way people write Linf budgets."""
    scaled = value * 255
    return f"{round(scaled)}/255" if abs(scaled - round(scaled)) < 1e-6 else f"{scaled:.3g}/255"


def budget_text(eps: float, norm: str = "linf") -> str:
    """A budget as people write it: 8/255 for Linf, the radius (0.5) for L2."""
    return f"{eps:.5g}" if norm == "l2" else over_255(eps)


def budget_line(config: dict[str, Any]) -> str:
    """How a report shows the budget: Linf in x/255 as people write it, L2 as a radius."""
    eps, step = config["eps"], config["step_size"]
    if config.get("norm", "linf") == "l2":
        return f"L2 eps {eps:.5g}, step {step:.5g}"
    return f"eps {eps:.5f} ({over_255(eps)}), step {step:.5f} ({over_255(step)})"


@dataclass(frozen=True)
class Settings:
    """How the attacks run (all budgets in pixel space)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    restarts: int = 1
    seed: int = 0
    num_classes: int = 10
    square_queries: int = eval_attacks.SQUARE_QUERIES
    spsa_samples: int = eval_attacks.SPSA_SAMPLES
    spsa_delta: float = eval_attacks.SPSA_DELTA
    spsa_iters: int = eval_attacks.SPSA_ITERS
    spsa_lr: float = eval_attacks.SPSA_LR
    spsa_batch: int = eval_attacks.SPSA_BATCH  # inputs per forward; results don't depend on it
    norm: str = "linf"  # the threat model of every attack: "linf" or "l2"


def attack_settings(name: str, settings: Settings) -> dict[str, Any]:
    """What `name` does, for the report."""
    if attack_family(name)[0] == "clean":
        return {"kind": "clean"}
    return _attack_settings(name, settings) | {"norm": settings.norm}


def _attack_settings(name: str, settings: Settings) -> dict[str, Any]:
    family, steps = attack_family(name)
    if needs_surrogate(name):
        crafted = name.removeprefix(TRANSFER)
        return {"kind": "transfer", "crafted_on": "surrogate", "crafted_with": crafted,
                "craft": attack_settings(crafted, settings),
                "scored": "the final point of each restart (TRADES's _pgd_blackbox)",
                "correct": "the evaluated model classifies the clean example and every scored "
                           "one correctly"}
    if family == "spsa":
        return {"kind": "black-box", "attacks": ["spsa"], "loss": "cw-margin",
                "samples": settings.spsa_samples,
                "queries_per_iteration": 2 * settings.spsa_samples, "delta": settings.spsa_delta,
                "iterations": settings.spsa_iters, "optimizer": "adam", "lr": settings.spsa_lr,
                "random_start": True}
    if family == "fgsm":  # FGM under L2
        return {"kind": "white-box", "loss": "ce", "steps": 1, "step_size": settings.eps,
                "random_start": False}
    if family in ("pgd", "cw"):
        return {"kind": "white-box", "loss": "ce" if family == "pgd" else "cw-margin",
                "steps": steps, "step_size": settings.step_size, "restarts": settings.restarts,
                "random_start": True}
    targets = max(1, min(eval_attacks.AA_TARGET_CLASSES, settings.num_classes - 1))
    if family == "aa":
        return {"kind": "autoattack", "version": "standard",
                "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "target_classes": targets,
                "square_queries": settings.square_queries}
    if family == "aa-apgd":
        return {"kind": "autoattack", "version": "custom", "attacks": ["apgd-ce", "apgd-t"],
                "target_classes": targets}
    return {"kind": "black-box", "version": "custom", "attacks": ["square"],
            "square_queries": settings.square_queries}


def run_attack(model: nn.Module, name: str, x: Tensor, y: Tensor, settings: Settings,
               seed: int, warnings: set[str] | None = None,
               surrogate: nn.Module | None = None) -> Tensor:
    """bool [B]: which examples `name` leaves correctly classified."""
    return attack(model, name, x, y, settings, seed, warnings, surrogate).correct


def attack(model: nn.Module, name: str, x: Tensor, y: Tensor, settings: Settings, seed: int,
           warnings: set[str] | None = None, surrogate: nn.Module | None = None
           ) -> eval_attacks.AttackResult:
    """What `name` finds on the batch (x, y) with the batch's `seed`. A transfer attack runs
    its white-box attack on `surrogate`, with the same seed, and scores its final points on
    `model` (so with the model itself as the surrogate it is never stronger than the
    white-box attack, which also counts the points on the way)."""
    family, steps = attack_family(name)
    check_norm_supported([name], settings.norm)
    if needs_surrogate(name):
        if surrogate is None:
            raise ValueError(f"{name} crafts its examples on a surrogate model: pass one")
        crafted = attack(surrogate, name.removeprefix(TRANSFER), x, y, settings, seed)
        return eval_attacks.transfer(model, x, y, crafted.finals)
    if family == "clean":
        return eval_attacks.AttackResult(x, eval_attacks.predict(model, x) == y)
    if family == "fgsm":
        return eval_attacks.fgsm(model, x, y, settings.eps, settings.norm)
    if family in ("pgd", "cw"):
        return eval_attacks.pgd(model, x, y, settings.eps, settings.step_size, steps,
                                loss="ce" if family == "pgd" else "cw",
                                restarts=settings.restarts, seed=seed, norm=settings.norm)
    if family == "spsa":
        return eval_attacks.spsa(model, x, y, settings.eps, settings.spsa_samples,
                                 settings.spsa_delta, settings.spsa_iters, settings.spsa_lr,
                                 seed=seed, max_batch=settings.spsa_batch)
    return eval_attacks.autoattack(model, x, y, settings.eps, family, seed=seed,
                                   num_classes=settings.num_classes,
                                   square_queries=settings.square_queries, warnings=warnings,
                                   norm=settings.norm)


def check_norm_supported(attacks: list[str], norm: str) -> None:
    """Refuse, before any work, an attack that has no form in the threat model `norm`."""
    unsupported = [name for name in attacks if attack_family(name)[0] in LINF_ONLY]
    if norm != "linf" and unsupported:
        raise ValueError(f"{', '.join(unsupported)} is implemented for --norm linf only; drop "
                         f"it from the attacks to evaluate with --norm {norm}")


def check_classes_supported(attacks: list[str], num_classes: int) -> None:
    """Refuse, before any work, AutoAttack on a model of fewer than 4 classes (pyautoattack
    only warns, then APGD-T fails with an IndexError deep inside)."""
    needs = [name for name in attacks if attack_family(name)[0] in AUTOATTACK_TARGETED]
    if needs and num_classes < AA_MIN_CLASSES:
        raise ValueError(f"{', '.join(needs)} run APGD-T, whose targeted DLR loss needs at "
                         f"least {AA_MIN_CLASSES} classes; the model has {num_classes}: use "
                         "pgdK, cwK or square instead")


@dataclass
class Results:
    """Per-example correctness of every attack (in the order given), seconds spent, and
    where the cross-entropy gradient at the clean image is exactly zero."""

    attacks: list[str]
    correct: dict[str, Tensor] = field(default_factory=dict)  # name -> bool [N] on the CPU
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: set[str] = field(default_factory=set)  # from pyautoattack, deduplicated
    zero_gradient: Tensor | None = None  # bool [N]

    @property
    def n(self) -> int:
        return len(next(iter(self.correct.values()))) if self.correct else 0

    def robust(self) -> Tensor:
        """Correct under every attack run (the clean pass included)."""
        stacked = torch.stack([self.correct[name] for name in self.attacks])
        return stacked.all(dim=0)


def attack_progress(seconds: dict[str, float], done: int, total: int | None) -> str:
    """Each attack's speed and, with a known total, the time it still needs: what the
    progress bar shows beside the overall ETA (an AutoAttack run is hours where PGD is
    minutes; the overall rate hides which)."""
    parts = []
    for name, spent in seconds.items():
        if spent <= 0 or done <= 0:
            continue
        rate = done / spent
        left = f", {tqdm.format_interval((total - done) / rate)} left" if total else ""
        parts.append(f"{name} {rate:.3g} img/s{left}")
    return " | ".join(parts)


def run_attacks(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: list[str],
    settings: Settings,
    total: int | None = None,
    progress: bool = True,
    keep: int = 0,
    surrogate: nn.Module | None = None,
    gradient_check: bool = True,
) -> tuple[Results, tuple[Tensor, Tensor] | None]:
    """Run every attack on every batch; also return the first `keep` examples (for checks).
    `surrogate`: the model transfer attacks craft their examples on. `gradient_check`: also
    find where the cross-entropy gradient is exactly zero (`Results.zero_gradient`, one more
    forward + backward per batch; the masking checks read it, model selection does not).

    "clean" is always run first (the ensemble is taken over clean and every attack)."""
    names = ["clean", *[a for a in attacks if a != "clean"]]
    transfer = [name for name in names if needs_surrogate(name)]
    check_norm_supported(names, settings.norm)
    check_classes_supported(names, settings.num_classes)
    if transfer and surrogate is None:  # before any work, not after hours of it
        raise ValueError(f"{', '.join(transfer)} craft their examples on a surrogate model: "
                         "pass surrogate=")
    results = Results(names, seconds=dict.fromkeys(names, 0.0))
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    zero_parts: list[Tensor] = []
    kept_x: list[Tensor] = []
    kept_y: list[Tensor] = []
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr, leave=False)
    seen = robust = 0  # every attack runs the model in eval mode (and restores its modes)
    for index, (x, y) in enumerate(batches):
        x, y = x.clone(), y.clone()  # FFCV reuses its buffers
        seed = derived_seed(settings.seed, index)
        everything = torch.ones_like(y, dtype=torch.bool)
        if gradient_check:
            zero_parts.append(eval_attacks.zero_gradient(model, x, y).cpu())
        for name in names:
            bar.set_description(name)
            synchronize(x.device)
            start = time.perf_counter()
            correct = run_attack(model, name, x, y, settings, seed, results.warnings,
                                 surrogate)
            synchronize(x.device)
            results.seconds[name] += time.perf_counter() - start
            parts[name].append(correct.cpu())
            everything &= correct
        if sum(len(t) for t in kept_y) < keep:
            kept_x.append(x.cpu())
            kept_y.append(y.cpu())
        seen += len(y)
        robust += int(everything.sum())
        bar.update(len(y))
        bar.set_postfix_str(f"robust {robust / seen:.1%} | "
                            + attack_progress(results.seconds, seen, total))
    bar.close()
    results.correct = {name: torch.cat(parts[name]) if parts[name] else torch.zeros(0, dtype=bool)
                       for name in names}
    if gradient_check:
        results.zero_gradient = (torch.cat(zero_parts) if zero_parts
                                 else torch.zeros(0, dtype=bool))
    kept = (torch.cat(kept_x)[:keep], torch.cat(kept_y)[:keep]) if kept_y else None
    return results, kept


@dataclass
class HugeEpsCheck:
    """PGD at a budget where any classifier should fall to ~0%."""

    eps: float
    steps: int
    step_size: float
    n: int
    correct: int
    seconds: float
    norm: str = "linf"

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def huge_budget(x: Tensor, norm: str = "linf") -> tuple[float, float]:
    """(eps, step) of the huge-eps probe: 0.5 and 0.05 for Linf. For L2 the same times
    sqrt(d), d the pixels of one image: that L2 ball holds the whole Linf 0.5 ball (whose
    corners are 0.5 sqrt(d) from x), so it is at least as permissive as the Linf probe at
    any resolution, and each step is as long as an Linf step of 0.05 (every pixel moved)."""
    if norm == "linf":
        return HUGE_EPS, HUGE_STEP_SIZE
    scale = math.sqrt(x[0].numel())
    return HUGE_EPS * scale, HUGE_STEP_SIZE * scale


def huge_eps_check(model: nn.Module, x: Tensor, y: Tensor, seed: int, device: torch.device,
                   batch_size: int, norm: str = "linf") -> HugeEpsCheck:
    """PGD-20 at eps 0.5 (step 0.05) on the given slice; for L2 `huge_budget`'s."""
    eps, step_size = huge_budget(x, norm)
    synchronize(device)
    start = time.perf_counter()
    correct = 0
    for begin in range(0, len(y), batch_size):
        xb = x[begin:begin + batch_size].to(device, memory_format=torch.channels_last)
        yb = y[begin:begin + batch_size].to(device)
        result = eval_attacks.pgd(model, xb, yb, eps, step_size, HUGE_STEPS,
                                  seed=derived_seed(seed, begin), norm=norm)
        correct += int(result.correct.sum())
    synchronize(device)
    return HugeEpsCheck(eps, HUGE_STEPS, step_size, len(y), correct,
                        time.perf_counter() - start, norm)


def stronger_pairs(attacks: list[str], eps: float = 8 / 255,
                   step_size: float = 2 / 255) -> list[tuple[str, str]]:
    """(weaker, stronger) pairs among `attacks`: the stronger must not score higher.

    PGD-k counts as stronger than FGSM only when its k steps can cross the ball from a random
    start (k * step_size >= 2 eps): a short PGD with small steps can fall behind FGSM's one
    full-eps step without anything being wrong."""

    def rank(name: str) -> tuple[int, int] | None:
        family, steps = attack_family(name)
        return {"clean": (0, 0), "fgsm": (1, 0), "pgd": (2, steps), "cw": (2, steps),
                "aa-apgd": (3, 0), "aa": (4, 0)}.get(family)

    pairs = []
    for weak in attacks:
        for strong in attacks:
            a, b = rank(weak), rank(strong)
            if a is None or b is None or weak == strong:
                continue
            same_loss = attack_family(weak)[0] == attack_family(strong)[0]
            if weak == "fgsm" and b[0] == 2 and b[1] * step_size < 2 * eps - 1e-12:
                continue
            if a[0] < b[0] or (a[0] == b[0] == 2 and same_loss and a[1] < b[1]):
                pairs.append((weak, strong))
    return pairs


def continues(weak: str, strong: str) -> bool:
    """Whether `strong` breaks every example `weak` breaks, by construction: any attack
    against no attack, and PGD-k against PGD-k' (k < k') of the same loss, which run_attacks
    starts from the same random points (correct after k' steps implies after k)."""
    (family, steps), (strong_family, strong_steps) = attack_family(weak), attack_family(strong)
    return weak == "clean" or (family == strong_family and 0 < steps < strong_steps)


def sanity_flags(results: Results, huge: HugeEpsCheck | None, num_classes: int,
                 precision: str, settings: Settings | None = None,
                 recorded_clean: float | None = None) -> list[dict[str, str]]:
    """Signs of gradient masking or of a broken set-up, each {"check", "message"}.
    `recorded_clean`: the clean accuracy the checkpoint recorded for itself, if any."""
    flags = []
    count = {name: int(c.sum()) for name, c in results.correct.items()}
    n = max(results.n, 1)

    def pct(name: str) -> str:
        return f"{count[name] / n:.2%}"

    def flag(check: str, message: str) -> None:
        flags.append({"check": check, "message": message})

    settings = settings or Settings(num_classes=num_classes)
    for weak, strong in stronger_pairs(results.attacks, settings.eps, settings.step_size):
        if count[strong] <= count[weak]:
            continue
        weak_only = int((results.correct[strong] & ~results.correct[weak]).sum())
        strong_only = int((results.correct[weak] & ~results.correct[strong]).sum())
        # Where the stronger attack continues the weaker one, any example it loses is wrong.
        # Otherwise (FGSM's one corner step against PGD's walk from a random start, PGD against
        # AutoAttack) each breaks a few examples the other misses on a sound model: flag only
        # a split of those examples more lopsided than equally strong attacks make once in a
        # thousand (a one-sided sign test).
        if (continues(weak, strong)
                or sign_test(weak_only, strong_only) < MONOTONIC_FALSE_ALARM):
            flag("monotonic", f"{strong} ({pct(strong)}) scores above the weaker {weak} "
                 f"({pct(weak)}): {weak} breaks {weak_only} of the examples {strong} leaves "
                 f"standing, {strong} {strong_only} of {weak}'s; a stronger attack should never "
                 "do worse; suspect gradient masking or a failing attack")
    if huge is not None and huge.n and huge.accuracy > HUGE_EPS_MAX_ACCURACY:
        flag("huge_eps", f"PGD-{huge.steps} at {_norm_name(huge.norm)}eps {huge.eps:.4g} leaves "
             f"{huge.accuracy:.2%} "
             "correct (expected ~0%): the gradients do not lead to adversarial examples "
             "(gradient masking, or a model that ignores its input)")
    white = [a for a in results.attacks if attack_family(a)[0] in WHITE_BOX]
    black = [a for a in results.attacks if attack_family(a)[0] in BLACK_BOX]
    if black and white:
        best = min(white, key=lambda a: count[a])
        beating = [a for a in black if count[a] < count[best]]
        if beating:
            which = ", ".join(f"{a} ({pct(a)})" for a in beating)
            verb = "attack {} beats" if len(beating) == 1 else "attacks {} beat"
            flag("black_box", f"the black-box {verb.format(which)} the best white-box attack "
                 f"{best} ({pct(best)}): gradient masking is likely")
    flags += _loss_masking_flags(results, count)
    if results.n:
        clean, bound = count["clean"] / n, chance_bound(results.n, num_classes)
        if clean < bound and bound > 1:  # too few examples for any score to count
            flag("chance", f"on {results.n} examples even a perfect score could come from "
                 f"guessing (chance {1 / num_classes:.2%}, one run in a million): evaluate more "
                 "examples to tell the model from chance")
        elif clean < bound:
            flag("chance", f"clean accuracy {pct('clean')} on {results.n} examples cannot be "
                 f"told from guessing (chance {1 / num_classes:.2%}; guessing stays below "
                 f"{bound:.2%} but for one run in a million): wrong checkpoint, wrong data, or "
                 "wrong input normalization?")
        elif recorded_clean is not None and clean < RECORDED_FRACTION * recorded_clean:
            flag("recorded_accuracy", f"clean accuracy {pct('clean')} is below half of the "
                 f"{recorded_clean:.2%} the checkpoint recorded on its held-out training "
                 "images: wrong data, resolution or input normalization?")
    if precision != "fp32":
        flag("precision", f"attacks ran in {precision}: low-precision gradients can overstate "
             "robustness; report fp32 numbers")
    return flags


def _loss_masking_flags(results: Results, count: dict[str, int]) -> list[dict[str, str]]:
    """The cross-entropy cannot guide an attack: its gradient is exactly zero, or attacks
    that follow it break far fewer examples than margin-based ones."""
    flags, n = [], max(results.n, 1)
    zero = results.zero_gradient
    if zero is not None and len(zero) and zero.float().mean() >= ZERO_GRADIENT_SHARE:
        flags.append({"check": "loss_saturation", "message":
                      f"the cross-entropy gradient is exactly zero on {zero.float().mean():.2%} "
                      "of the examples (a softmax saturated in fp32, or a step function on the "
                      "input): FGSM, PGD and APGD cannot move them, and what they leave "
                      "standing is masking, not robustness"})
    clean = results.correct["clean"]
    family = {name: attack_family(name) for name in results.attacks}
    ce = [a for a in results.attacks if family[a][0] in CE_ATTACKS]
    margin = [a for a in results.attacks if family[a][0] in MARGIN_ATTACKS]
    if not clean.any() or not ce or not margin:
        return flags

    def broke(name: str) -> float:  # share of the clean-correct examples the attack broke
        return float((clean & ~results.correct[name]).sum() / clean.sum())

    ce_best, margin_best = max(ce, key=broke), max(margin, key=broke)
    if broke(ce_best) < CHANGED_NOTHING and broke(margin_best) >= broke(ce_best) + CHANGED_MORE:
        flags.append({"check": "attack_changed_nothing", "message":
                      f"{', '.join(ce)} broke {broke(ce_best):.2%} of the correctly "
                      f"classified examples, {margin_best} {broke(margin_best):.2%}: the "
                      "cross-entropy gives attacks no signal (saturated logits?); only the "
                      "margin-based numbers mean anything"})
    pgd = [a for a in ce if family[a][0] == "pgd" and family[a][1] >= GAP_MIN_STEPS]
    if pgd:
        ce_name = min(pgd, key=lambda a: count[a])
        margin_name = min(margin, key=lambda a: count[a])
        ce_acc, margin_acc = count[ce_name] / n, count[margin_name] / n
        if ce_acc - margin_acc > max(MARGIN_GAP, MARGIN_GAP_RELATIVE * ce_acc):
            flags.append({"check": "ce_vs_margin", "message":
                          f"{margin_name} ({margin_acc:.2%}) is {100 * (ce_acc - margin_acc):.1f} "
                          f"points below {ce_name} ({ce_acc:.2%}): cross-entropy PGD is far "
                          "weaker than margin-based attacks here, a sign of a saturated or "
                          "masked loss; report the margin-based numbers"})
    return flags


def _norm_name(norm: str) -> str:
    """The prefix messages give a budget: none for Linf (as before L2 existed), "L2 " else."""
    return "" if norm == "linf" else "L2 "


def clean_and_pgd(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], eps: float,
                  step_size: float, steps: int, seed: int = 0, num_classes: int = 10,
                  norm: str = "linf", progress: bool = False) -> dict[str, Any]:
    """Clean and PGD-`steps` accuracy, exactly as `fastibd.evaluate --attacks pgdK --eps EPS
    --step-size STEP --seed SEED --norm NORM --batch-size B` reports them for batches of B
    (cross-entropy, one random start, fp32; the starts are seeded per batch);
    `progress`: a bar over the batches."""
    name = f"pgd{steps}"
    settings = Settings(eps, step_size, 1, seed, num_classes, norm=norm)
    results, _ = run_attacks(model, batches, [name], settings, progress=progress,
                             gradient_check=False)
    n = max(results.n, 1)
    budget = (f"eps {eps * 255:.4g}/255, step {step_size * 255:.4g}/255" if norm == "linf" else
              f"L2 eps {eps:.4g}, step {step_size:.4g}")
    return {"clean_acc": results.correct["clean"].float().sum().item() / n,
            "pgd_acc": results.correct[name].float().sum().item() / n,
            "eval_images": results.n, "attack": f"{name}, {budget}"}

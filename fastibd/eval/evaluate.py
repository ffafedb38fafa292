"""Robustness report of a classifier: `python -m fastibd.evaluate --ckpt PATH --data VAL.beton`.

Runs clean, FGSM, PGD-k, CW-inf-k, AutoAttack (and its cheaper or black-box parts) on the
first N validation images, keeps every example's correctness under every attack, and reports
each attack alone and the ensemble "robust accuracy" (correct under every attack run). Checks
that flag gradient masking are printed and saved with the numbers:
  - accuracy must not rise with a stronger attack (aa <= pgd100 <= pgd20 <= fgsm <= clean);
  - PGD at a huge eps (0.5) must reach ~0% on a slice of the images;
  - the black-box Square attack must not beat the white-box attacks.

    python -m fastibd.evaluate --ckpt runs/cifar/best.pt --data data/cifar10/val.beton \\
        --attacks clean,pgd20,cw100,aa --n 1000 --out report.json

Models take [0, 1] images and normalize inside, so eps is always in pixel space.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastibd.cli import ArgumentParser, bounded
from fastibd.config import parse_number
from fastibd.device import resolve_device
from fastibd.errors import UserError, exit_on_user_error
from fastibd.eval import attacks as eval_attacks
from fastibd.models import ARCHITECTURES
from fastibd.models.teachers import FORMATS, load_teacher

PROG = "fastibd.evaluate"
SCHEMA_VERSION = 1
DEFAULT_ATTACKS = "clean,fgsm,pgd20,pgd100,cw100,aa"
ATTACK_NAME = re.compile(r"^(clean|fgsm|aa|aa-apgd|square|(pgd|cw)([1-9]\d*))$")
ATTACK_HELP = ("clean, fgsm, pgdK (PGD-K, cross-entropy), cwK (PGD-K on the CW margin), aa "
               "(AutoAttack standard), aa-apgd (APGD-CE + APGD-T), square (black-box)")
WHITE_BOX = ("fgsm", "pgd", "cw", "aa-apgd")
HUGE_EPS, HUGE_STEPS, HUGE_STEP_SIZE = 0.5, 20, 0.05
HUGE_EPS_MAX_ACCURACY = 0.02  # anything clearly above 0% at eps 0.5 means the gradients lie
CHANCE_FACTOR = 1.5  # clean accuracy below 1.5x chance: wrong file or wrong normalization


# ----------------------------------------------------------------------------- parsing


def parse_budget(text: str) -> float:
    """An eps or step size in pixel space: '8/255' or '0.031'; must be in (0, 1]."""
    try:
        value = parse_number(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (write e.g. 8/255 or "
                                         "0.031)") from None
    if not 0.0 < value <= 1.0:
        hint = f"; {text} looks like {text}/255" if 1.0 < value <= 255.0 else ""
        raise argparse.ArgumentTypeError(
            f"{text} is outside (0, 1]: budgets are in pixel space on [0, 1] images{hint}")
    return value


def parse_attacks(text: str) -> list[str]:
    """Comma-separated attack names, validated, duplicates dropped, order kept."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if not ATTACK_NAME.match(name):
            raise argparse.ArgumentTypeError(f"unknown attack {raw.strip()!r}; use {ATTACK_HELP}")
        if name not in names:
            names.append(name)
    if not names:
        raise argparse.ArgumentTypeError(f"no attack given; use {ATTACK_HELP}")
    return names


def attack_family(name: str) -> tuple[str, int]:
    """('pgd', 20) for 'pgd20', ('cw', 100) for 'cw100', (name, 0) for the others."""
    match = ATTACK_NAME.match(name)
    if match is None:
        raise ValueError(f"unknown attack {name!r}")
    if match.group(2):
        return match.group(2), int(match.group(3))
    return name, 0


def over_255(value: float) -> str:
    """8/255 for 0.0313725..., the way people write budgets."""
    scaled = value * 255
    return f"{round(scaled)}/255" if abs(scaled - round(scaled)) < 1e-6 else f"{scaled:.3g}/255"


# ----------------------------------------------------------------------------- attacks


@dataclass(frozen=True)
class Settings:
    """How the attacks run (all budgets in pixel space)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    restarts: int = 1
    seed: int = 0
    num_classes: int = 10
    square_queries: int = eval_attacks.SQUARE_QUERIES


def attack_settings(name: str, settings: Settings) -> dict[str, Any]:
    """What `name` does, for the report."""
    family, steps = attack_family(name)
    if family == "clean":
        return {"kind": "clean"}
    if family == "fgsm":
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
               seed: int, warnings: set[str] | None = None) -> Tensor:
    """bool [B]: which examples `name` leaves correctly classified."""
    family, steps = attack_family(name)
    if family == "clean":
        return eval_attacks.predict(model, x) == y
    if family == "fgsm":
        return eval_attacks.fgsm(model, x, y, settings.eps).correct
    if family in ("pgd", "cw"):
        return eval_attacks.pgd(model, x, y, settings.eps, settings.step_size, steps,
                                loss="ce" if family == "pgd" else "cw",
                                restarts=settings.restarts, seed=seed).correct
    return eval_attacks.autoattack(model, x, y, settings.eps, family, seed=seed,
                                   num_classes=settings.num_classes,
                                   square_queries=settings.square_queries,
                                   warnings=warnings).correct


@dataclass
class Results:
    """Per-example correctness of every attack (in the order given), and seconds spent."""

    attacks: list[str]
    correct: dict[str, Tensor] = field(default_factory=dict)  # name -> bool [N] on the CPU
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: set[str] = field(default_factory=set)  # from pyautoattack, deduplicated

    @property
    def n(self) -> int:
        return len(next(iter(self.correct.values()))) if self.correct else 0

    def robust(self) -> Tensor:
        """Correct under every attack run (the clean pass included)."""
        stacked = torch.stack([self.correct[name] for name in self.attacks])
        return stacked.all(dim=0)


def batch_seed(seed: int, index: int) -> int:
    """An independent seed per batch, reproducible from the user's seed."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_attacks(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    attacks: list[str],
    settings: Settings,
    total: int | None = None,
    progress: bool = True,
    keep: int = 0,
) -> tuple[Results, tuple[Tensor, Tensor] | None]:
    """Run every attack on every batch; also return the first `keep` examples (for checks).

    "clean" is always run first (the ensemble is taken over clean and every attack)."""
    names = ["clean", *[a for a in attacks if a != "clean"]]
    results = Results(names, seconds=dict.fromkeys(names, 0.0))
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    kept_x: list[Tensor] = []
    kept_y: list[Tensor] = []
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr, leave=False)
    seen = robust = 0  # every attack runs the model in eval mode (and restores its modes)
    for index, (x, y) in enumerate(batches):
        x, y = x.clone(), y.clone()  # FFCV reuses its buffers
        seed = batch_seed(settings.seed, index)
        everything = torch.ones_like(y, dtype=torch.bool)
        for name in names:
            bar.set_description(name)
            _sync(x.device)
            start = time.perf_counter()
            correct = run_attack(model, name, x, y, settings, seed, results.warnings)
            _sync(x.device)
            results.seconds[name] += time.perf_counter() - start
            parts[name].append(correct.cpu())
            everything &= correct
        if sum(len(t) for t in kept_y) < keep:
            kept_x.append(x.cpu())
            kept_y.append(y.cpu())
        seen += len(y)
        robust += int(everything.sum())
        bar.update(len(y))
        bar.set_postfix(robust=f"{robust / seen:.1%}")
    bar.close()
    results.correct = {name: torch.cat(parts[name]) if parts[name] else torch.zeros(0, dtype=bool)
                       for name in names}
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

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def huge_eps_check(model: nn.Module, x: Tensor, y: Tensor, seed: int, device: torch.device,
                   batch_size: int) -> HugeEpsCheck:
    """PGD-20 at eps 0.5 (step 0.05) on the given slice."""
    _sync(device)
    start = time.perf_counter()
    correct = 0
    for begin in range(0, len(y), batch_size):
        xb = x[begin:begin + batch_size].to(device, memory_format=torch.channels_last)
        yb = y[begin:begin + batch_size].to(device)
        result = eval_attacks.pgd(model, xb, yb, HUGE_EPS, HUGE_STEP_SIZE, HUGE_STEPS,
                                  seed=batch_seed(seed, begin))
        correct += int(result.correct.sum())
    _sync(device)
    return HugeEpsCheck(HUGE_EPS, HUGE_STEPS, HUGE_STEP_SIZE, len(y), correct,
                        time.perf_counter() - start)


# ----------------------------------------------------------------------------- checks


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


def sanity_flags(results: Results, huge: HugeEpsCheck | None, num_classes: int,
                 precision: str, settings: Settings | None = None) -> list[dict[str, str]]:
    """Signs of gradient masking or of a broken set-up, each {"check", "message"}."""
    flags = []
    count = {name: int(c.sum()) for name, c in results.correct.items()}
    n = max(results.n, 1)

    def pct(name: str) -> str:
        return f"{count[name] / n:.2%}"

    settings = settings or Settings(num_classes=num_classes)
    for weak, strong in stronger_pairs(results.attacks, settings.eps, settings.step_size):
        if count[strong] > count[weak]:
            flags.append({"check": "monotonic", "message":
                          f"{strong} ({pct(strong)}) scores above the weaker {weak} "
                          f"({pct(weak)}): a stronger attack should never do worse; suspect "
                          "gradient masking or a failing attack"})
    if huge is not None and huge.n and huge.accuracy > HUGE_EPS_MAX_ACCURACY:
        flags.append({"check": "huge_eps", "message":
                      f"PGD-{huge.steps} at eps {huge.eps} leaves {huge.accuracy:.2%} correct "
                      "(expected ~0%): the gradients do not lead to adversarial examples "
                      "(gradient masking, or a model that ignores its input)"})
    white = [a for a in results.attacks if attack_family(a)[0] in WHITE_BOX]
    if "square" in results.attacks and white:
        best = min(white, key=lambda a: count[a])
        if count["square"] < count[best]:
            flags.append({"check": "black_box", "message":
                          f"the black-box square attack ({pct('square')}) beats the best "
                          f"white-box attack {best} ({pct(best)}): gradient masking is likely"})
    if results.n and count["clean"] / n < CHANCE_FACTOR / num_classes:
        flags.append({"check": "chance", "message":
                      f"clean accuracy {pct('clean')} is near chance ({1 / num_classes:.2%}): "
                      "wrong checkpoint, wrong data, or wrong input normalization?"})
    if precision != "fp32":
        flags.append({"check": "precision", "message":
                      f"attacks ran in {precision}: low-precision gradients can overstate "
                      "robustness; report fp32 numbers"})
    return flags


# ----------------------------------------------------------------------------- the report


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON-safe values (Paths to strings, tuples to lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def build_report(results: Results, settings: Settings, huge: HugeEpsCheck | None,
                 flags: list[dict[str, str]], context: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: `context` brings config, checkpoint, model, data and environment."""
    n = results.n
    attacks = {}
    for name in results.attacks:
        correct = int(results.correct[name].sum())
        attacks[name] = {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n,
                         "time_s": results.seconds[name],
                         "settings": attack_settings(name, settings)}
    robust = int(results.robust().sum())
    report = {
        "tool": PROG,
        "schema_version": SCHEMA_VERSION,
        **_plain(context),
        "attacks": attacks,
        "robust": {"accuracy": robust / n if n else 0.0, "correct": robust, "n": n,
                   "attacks": [a for a in results.attacks if a != "clean"] or ["clean"]},
        "sanity": {"huge_eps": None if huge is None else {
            "eps": huge.eps, "steps": huge.steps, "step_size": huge.step_size, "n": huge.n,
            "accuracy": huge.accuracy, "correct": huge.correct, "time_s": huge.seconds,
            "max_accuracy": HUGE_EPS_MAX_ACCURACY, "ok": huge.accuracy <= HUGE_EPS_MAX_ACCURACY}},
        "flags": flags,
        "pyautoattack_warnings": sorted(results.warnings),
        "per_example": {name: "".join("1" if c else "0" for c in results.correct[name].tolist())
                        for name in results.attacks},
    }
    return report


DESCRIPTIONS = {"clean": "no attack", "fgsm": "one step of eps, cross-entropy",
                "pgd": "cross-entropy, random start", "cw": "CW margin, random start",
                "aa": "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)",
                "aa-apgd": "APGD-CE + APGD-T", "square": "black-box, score-based"}


def format_table(report: dict[str, Any]) -> str:
    """What a person reads: set-up, one row per attack, the ensemble, the checks."""
    config, model, data = report["config"], report["model"], report["data"]
    checkpoint = report["checkpoint"]
    lines = [
        f"checkpoint  {checkpoint['path']}  (sha256 {checkpoint['sha256'][:12]})",
        f"model       {model['arch']}, {model['num_classes']} classes, width {model['width_mult']}"
        f", normalization {model['normalization']}",
        f"data        {data['path']}",
        f"examples    first {data['num_examples']} of {data['dataset_size']}",
        f"settings    eps {config['eps']:.5f} ({over_255(config['eps'])}), step "
        f"{config['step_size']:.5f} ({over_255(config['step_size'])}), restarts "
        f"{config['restarts']}, seed {config['seed']}, {config['precision']} on "
        f"{report['environment']['device']}, batch {config['batch_size']}",
        "",
        f"{'attack':<10} {'accuracy':>9} {'correct':>13} {'time':>10}   what",
    ]
    for name, row in report["attacks"].items():
        fraction = f"{row['correct']}/{row['n']}"
        lines.append(f"{name:<10} {row['accuracy'] * 100:8.2f}% {fraction:>13} "
                     f"{row['time_s']:8.1f} s   {DESCRIPTIONS[attack_family(name)[0]]}")
    robust = report["robust"]
    fraction = f"{robust['correct']}/{robust['n']}"
    lines.append(f"{'robust':<10} {robust['accuracy'] * 100:8.2f}% {fraction:>13} "
                 f"{'':>10}   correct under every attack above")
    huge = report["sanity"]["huge_eps"]
    lines.append("")
    if huge is not None:
        verdict = "ok" if huge["ok"] else "FLAGGED"
        lines.append(f"sanity      PGD-{huge['steps']} at eps {huge['eps']} (step "
                     f"{huge['step_size']}) on the first {huge['n']}: "
                     f"{huge['accuracy'] * 100:.2f}% (should be ~0%), {huge['time_s']:.1f} s: "
                     f"{verdict}")
    for flag in report["flags"]:
        lines.append(f"FLAG        [{flag['check']}] {flag['message']}")
    if not report["flags"]:
        lines.append("flags       none")
    for warning in report["pyautoattack_warnings"]:
        lines.append(f"autoattack  {warning.splitlines()[0]}")
    lines.append(f"total       {report['time_s']:.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data + model


class Autocast(nn.Module):
    """Runs the wrapped model under autocast and returns fp32 logits (for --precision bf16)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def check_classes(labels: np.ndarray, num_classes: int, data: Path, ckpt: Path) -> int:
    """The number of classes in the data; it must be the model's."""
    if len(labels) == 0:
        raise UserError(f"{data} holds no examples")
    classes = int(labels.max()) + 1
    if classes != num_classes:
        raise UserError(f"{data} has {classes} classes (labels 0..{classes - 1}) but the model "
                        f"in {ckpt} predicts {num_classes}: wrong data or wrong checkpoint")
    return classes


def val_batches(path: Path, n: int, batch_size: int, device: torch.device, pipeline: str,
                resolution: int, workers: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The first n images of a .beton or .npz in order, as [0, 1] channels_last batches."""
    from fastibd.data import LoaderOptions, cifar_loader, imagenet_val_loader

    options = LoaderOptions(batch_size=batch_size, device=device, num_workers=workers,
                            order="sequential", indices=tuple(range(n)))
    if pipeline == "cifar":
        return iter(cifar_loader(path, False, options))
    return iter(imagenet_val_loader(path, options, resolution))


# ----------------------------------------------------------------------------- CLI


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="checkpoint: fastibd, RobustBench, robustness library, state_dict")
    parser.add_argument("--data", type=Path, required=True,
                        help="validation .beton (or .npz: write_ffcv.py --format npz)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default=None,
                        help="architecture (needed unless the checkpoint is fastibd's)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="checkpoint layout")
    parser.add_argument("--normalization", default=None,
                        help="input normalization of a foreign checkpoint (default: from the "
                             "file, else the architecture's convention)")
    parser.add_argument("--width-mult", type=bounded(float, 1e-3, 64), default=1.0,
                        help="channel multiplier of a foreign checkpoint's architecture")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full-pickle checkpoints (they can run code)")
    parser.add_argument("--attacks", type=parse_attacks, default=parse_attacks(DEFAULT_ATTACKS),
                        metavar="LIST", help=ATTACK_HELP)
    parser.add_argument("--eps", type=parse_budget, default=8 / 255,
                        help="Linf budget in pixel space, e.g. 8/255 or 0.031")
    parser.add_argument("--step-size", type=parse_budget, default=2 / 255,
                        help="PGD / CW step size")
    parser.add_argument("--restarts", type=bounded(int, 1), default=1,
                        help="PGD / CW random restarts (worst case per example)")
    parser.add_argument("--square-queries", type=bounded(int, 1), default=5000,
                        help="queries of the Square attack (aa uses it too)")
    parser.add_argument("--n", type=bounded(int, 1), default=None,
                        help="evaluate the first N examples (default: all)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=256)
    parser.add_argument("--seed", type=bounded(int, 0), default=0)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--pipeline", choices=("auto", "cifar", "imagenet"), default="auto",
                        help="cifar: images as stored; imagenet: center crop + resize; auto: by "
                             "the architecture's input size")
    parser.add_argument("--resolution", type=bounded(int, 8), default=224,
                        help="imagenet pipeline: input resolution")
    parser.add_argument("--workers", type=bounded(int, 1), default=min(8, _cpus()),
                        help="FFCV decoding threads")
    parser.add_argument("--sanity-n", type=bounded(int, 0), default=100,
                        help="images for the huge-eps PGD check (0: skip it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, default=Path("report.json"), help="JSON report")
    return parser


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


@exit_on_user_error(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    from fastibd.data import dataset_labels

    check_writable(args.out)  # before the attacks, not after hours of them
    device = resolve_device(args.device, "--device")
    labels = dataset_labels(args.data)  # cheap: fail on bad data before loading anything big
    model = load_teacher(args.arch, args.ckpt, args.format, normalization=args.normalization,
                         width_mult=args.width_mult, trust_pickle=args.trust_pickle,
                         device=device)
    model = model.to(memory_format=torch.channels_last)
    spec = model.spec
    num_classes = check_classes(labels, spec.num_classes, args.data, args.ckpt)
    n = len(labels) if args.n is None else min(args.n, len(labels))
    if args.n is not None and args.n > len(labels):
        print(f"note: {args.data} holds {len(labels)} examples; evaluating all of them",
              file=sys.stderr)
    pipeline = args.pipeline
    if pipeline == "auto":
        pipeline = "imagenet" if ARCHITECTURES[spec.arch][1] >= 128 else "cifar"
    attacked: nn.Module = model
    if args.precision == "bf16":
        attacked = Autocast(model, torch.bfloat16)

    torch.manual_seed(args.seed)
    settings = Settings(args.eps, args.step_size, args.restarts, args.seed, num_classes,
                        args.square_queries)
    batches = val_batches(args.data, n, args.batch_size, device, pipeline, args.resolution,
                          args.workers)
    results, kept = run_attacks(attacked, batches, args.attacks, settings, total=n,
                                progress=not args.no_progress, keep=args.sanity_n)
    huge = None
    if args.sanity_n and kept is not None:
        huge = huge_eps_check(attacked, *kept, seed=args.seed, device=device,
                              batch_size=args.batch_size)
    flags = sanity_flags(results, huge, num_classes, args.precision, settings)

    config = {key: value for key, value in vars(args).items() if key != "no_progress"}
    config |= {"pipeline": pipeline, "eps_255": args.eps * 255,
               "step_size_255": args.step_size * 255}
    context = {
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "config": config,
        "checkpoint": {"path": args.ckpt.resolve(), "sha256": sha256(args.ckpt),
                       "bytes": args.ckpt.stat().st_size},
        "model": asdict(spec),
        "data": {"path": args.data.resolve(), "num_examples": results.n,
                 "dataset_size": len(labels), "num_classes": num_classes},
        "environment": {"device": str(device), "torch": torch.__version__,
                        "pyautoattack": _version("pyautoattack"),
                        "python": platform.python_version()},
    }
    report = build_report(results, settings, huge, flags, context)
    report["time_s"] = time.perf_counter() - started
    print(format_table(report))
    try:
        args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    except OSError as err:
        raise UserError(f"cannot write {args.out}: {err.strerror}") from None
    print(f"report      {args.out}")
    return 0


def check_writable(path: Path) -> None:
    """Fail early when the report could not be written."""
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name such as {path}/report.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder of --out {path}: {err.strerror}") from None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())

"""Robustness report of a classifier: `python -m fastibd.evaluate --ckpt PATH --data VAL.beton`.

Runs clean, FGSM, PGD-k, CW-inf-k, AutoAttack (and its cheaper or black-box parts), and the
black-box SPSA and transfer attacks (crafted on a --surrogate model) on the first N validation
images, keeps every example's correctness under every attack, and reports each attack alone
and the ensemble "robust accuracy" (correct under every attack run). Checks that flag gradient
masking are printed and saved with the numbers:
  - accuracy must not rise with a stronger attack (aa <= pgd100 <= pgd20 <= fgsm <= clean);
  - PGD at a huge eps (0.5) must reach ~0% on a slice of the images;
  - no black-box attack (square, spsa, transfer-*) may beat the white-box attacks.

    python -m fastibd.evaluate --ckpt runs/cifar/best.pt --data data/cifar10/val.beton \\
        --attacks clean,pgd20,cw100,aa --n 1000 --out report.json
    python -m fastibd.evaluate --ckpt runs/cifar/best.pt --data data/cifar10/val.beton \\
        --attacks clean,transfer-fgsm,transfer-pgd100,spsa,square --surrogate other/best.pt

Models take [0, 1] images and normalize inside, so eps is always in pixel space. --norm l2
runs every attack in the L2 threat model (FGM, PGD-L2, CW-L2, AutoAttack and Square "L2"):

    python -m fastibd.evaluate --ckpt runs/cifar10_rn18_l2/best.pt \
        --data data/cifar10/val.beton --norm l2 --eps 0.5 --attacks clean,pgd20,cw100,aa
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastibd.cli import ArgumentParser, DefaultsHelpFormatter, bounded, parse_budget, writable_file
from fastibd.data import (
    DEFAULT_CROP_RATIO,
    LoaderOptions,
    dataset_labels,
    dataset_resolution,
    first_examples,
)
from fastibd.device import resolve_device
from fastibd.errors import UserError, exit_on_user_error
from fastibd.eval import attacks as eval_attacks
from fastibd.eval.robustness import (
    ATTACK_HELP,
    HUGE_EPS_MAX_ACCURACY,
    HugeEpsCheck,
    Results,
    Settings,
    attack_family,
    attack_settings,
    budget_line,
    check_classes_supported,
    check_norm_supported,
    huge_eps_check,
    needs_surrogate,
    parse_attacks,
    run_attacks,
    sanity_flags,
)
from fastibd.models import (
    ARCHITECTURES,
    NORMALIZATIONS,
    ModelSpec,
    TappedModel,
    conventional_resolution,
    default_pipeline,
)
from fastibd.models.checkpoint import sha256_file
from fastibd.models.teachers import (
    FORMATS,
    LoadedCheckpoint,
    accuracy_by_normalization,
    better_normalization,
    load_checkpoint,
)

PROG = "fastibd.evaluate"
SCHEMA_VERSION = 1
DEFAULT_ATTACKS = "clean,fgsm,pgd20,pgd100,cw100,aa"
# (eps, step) when --eps / --step-size are not given: Linf 8/255 and 2/255; L2 0.5, the
# RobustBench CIFAR L2 track's eps, and a step of eps/4 as the Linf default's 2/255 = eps/4
DEFAULT_BUDGETS = {"linf": ("8/255", "2/255"), "l2": ("0.5", None)}


# ----------------------------------------------------------------------------- parsing


def resolve_budgets(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """--eps and --step-size as numbers, checked for --norm (parsed after it: an L2 eps such
    as 3.0 is valid, a Linf one is not), the norm's defaults where they are not given."""
    eps_default, step_default = DEFAULT_BUDGETS[args.norm]
    for option, key, default in (("--eps", "eps", eps_default),
                                 ("--step-size", "step_size", step_default)):
        text = getattr(args, key) or default
        try:
            value = None if text is None else parse_budget(text, args.norm)
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument {option}: {err}")
        setattr(args, key, value)
    if args.step_size is None:
        args.step_size = args.eps / 4


# ----------------------------------------------------------------------------- the report


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
        seconds = results.seconds[name]
        attacks[name] = {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n,
                         "time_s": seconds, "examples_per_s": n / seconds if seconds else None,
                         "settings": attack_settings(name, settings)}
    zero = results.zero_gradient
    zero_count = int(zero.sum()) if zero is not None else 0
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
            "norm": huge.norm,
            "accuracy": huge.accuracy, "correct": huge.correct, "time_s": huge.seconds,
            "max_accuracy": HUGE_EPS_MAX_ACCURACY, "ok": huge.accuracy <= HUGE_EPS_MAX_ACCURACY},
            "zero_gradient": {"count": zero_count, "n": n,
                              "share": zero_count / n if n else 0.0}},
        "flags": flags,
        "pyautoattack_warnings": sorted(results.warnings),
        "per_example": {name: "".join("1" if c else "0" for c in results.correct[name].tolist())
                        for name in results.attacks},
    }
    return report


DESCRIPTIONS = {"clean": "no attack", "fgsm": "one step of eps, cross-entropy",
                "pgd": "cross-entropy, random start", "cw": "CW margin, random start",
                "aa": "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)",
                "aa-apgd": "APGD-CE + APGD-T", "square": "black-box, score-based",
                "spsa": "black-box, SPSA gradient estimate + Adam, CW margin",
                "transfer-fgsm": "FGSM crafted on the surrogate",
                "transfer-pgd": "PGD crafted on the surrogate (cross-entropy, random start)"}


def format_table(report: dict[str, Any]) -> str:
    """What a person reads: set-up, one row per attack, the ensemble, the checks."""
    config, model, data = report["config"], report["model"], report["data"]
    checkpoint = report["checkpoint"]
    lines = [
        f"checkpoint  {checkpoint['path']}  (sha256 {checkpoint['sha256'][:12]})",
        f"model       {model['arch']}, {model['num_classes']} classes, width {model['width_mult']}"
        f", normalization {model['normalization']}",
        f"data        {data['path']}, {data['resolution']} px"
        + ("" if data.get("crop_ratio") is None else
           f" (center crop {data['crop_ratio']:.4g} of the shorter side)")
        + f" (trained at {model['trained_resolution']})",
        f"examples    first {data['num_examples']} of {data['dataset_size']}, "
        f"{sum(c > 0 for c in data['class_counts'])} of {model['num_classes']} classes",
        f"settings    {budget_line(config)}, restarts "
        f"{config['restarts']}, seed {config['seed']}, {config['precision']} on "
        f"{report['environment']['device']}, batch {config['batch_size']}",
        *black_box_lines(report),
        "",
    ]
    width = max(10, *map(len, report["attacks"]))  # transfer-pgd100 is longer than pgd100
    lines.append(f"{'attack':<{width}} {'accuracy':>9} {'correct':>13} {'time':>10} "
                 f"{'img/s':>9}   what")
    for name, row in report["attacks"].items():
        fraction = f"{row['correct']}/{row['n']}"
        rate = "" if row["examples_per_s"] is None else f"{row['examples_per_s']:.1f}"
        lines.append(f"{name:<{width}} {row['accuracy'] * 100:8.2f}% {fraction:>13} "
                     f"{row['time_s']:8.1f} s {rate:>9}   "
                     f"{DESCRIPTIONS[attack_family(name)[0]]}")
    robust = report["robust"]
    fraction = f"{robust['correct']}/{robust['n']}"
    lines.append(f"{'robust':<{width}} {robust['accuracy'] * 100:8.2f}% {fraction:>13} "
                 f"{'':>10} {'':>9}   correct under every attack above")
    huge = report["sanity"]["huge_eps"]
    lines.append("")
    if huge is not None:
        verdict = "ok" if huge["ok"] else "FLAGGED"
        norm = "L2 " if huge.get("norm") == "l2" else ""
        lines.append(f"sanity      PGD-{huge['steps']} at {norm}eps {huge['eps']:.4g} (step "
                     f"{huge['step_size']:.4g}) on the first {huge['n']}: "
                     f"{huge['accuracy'] * 100:.2f}% (should be ~0%), {huge['time_s']:.1f} s: "
                     f"{verdict}")
    zero = report["sanity"]["zero_gradient"]
    lines.append(f"sanity      cross-entropy gradient exactly zero on {zero['count']} of "
                 f"{zero['n']} examples")
    for flag in report["flags"]:
        lines.append(f"FLAG        [{flag['check']}] {flag['message']}")
    if not report["flags"]:
        lines.append("flags       none")
    for warning in report["pyautoattack_warnings"]:
        lines.append(f"autoattack  {warning.splitlines()[0]}")
    lines.append(f"total       {report['time_s']:.1f} s")
    return "\n".join(lines)


def black_box_lines(report: dict[str, Any]) -> list[str]:
    """The set-up of the black-box attacks run: the surrogate, SPSA's settings."""
    lines = []
    surrogate = report.get("surrogate")
    if surrogate is not None:
        spec = surrogate["model"]
        lines.append(f"surrogate   {surrogate['path']}  (sha256 {surrogate['sha256'][:12]}), "
                     f"{spec['arch']}, width {spec['width_mult']}, normalization "
                     f"{spec['normalization']}")
    spsa = report["attacks"].get("spsa")
    if spsa is not None:
        config = spsa["settings"]
        lines.append(f"spsa        {config['samples']} directions "
                     f"({config['queries_per_iteration']} queries) per iteration, "
                     f"{config['iterations']} iterations, delta {config['delta']}, Adam lr "
                     f"{config['lr']}")
    return lines


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


def check_classes(labels: np.ndarray, num_classes: int, data: Path, ckpt: Path) -> None:
    """Every label must be one the model can predict (a subset of its classes is fine)."""
    if len(labels) == 0:
        raise UserError(f"{data} holds no examples")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{data} has labels {labels.min()}..{labels.max()} but the model in "
                        f"{ckpt} predicts {num_classes} classes (0..{num_classes - 1}): wrong "
                        "data or wrong checkpoint")


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """How many of `labels` fall in each of the model's classes (the report's histogram)."""
    return np.bincount(labels, minlength=num_classes).tolist()


def check_resolution(spec: ModelSpec, pipeline: str, data: Path, asked: int | None,
                     allow_change: bool, ckpt: Path) -> tuple[int, int, list[dict[str, str]]]:
    """(resolution the model is fed, resolution it was trained for, flags). A mismatch is
    refused unless `allow_change` (then flagged): a CIFAR network run on 64-px images, or an
    ImageNet one at another size, scores garbage without any error."""
    trained = spec.resolution or conventional_resolution(spec.arch)
    source = ("recorded in the checkpoint" if spec.resolution else
              f"the usual input of a {spec.arch}: the file records none")
    if pipeline == "cifar":
        fed, where = dataset_resolution(data), f"the images in {data} are"
        if asked is not None and asked != fed:
            raise UserError(f"--resolution {asked} applies to the imagenet pipeline only; "
                            f"the cifar pipeline feeds images as stored ({fed} px here)")
    else:
        fed, where = (asked or trained), "--resolution is"
    if fed == trained:
        return fed, trained, []
    if not allow_change:
        raise UserError(f"the model in {ckpt} takes {trained}x{trained} inputs ({source}) but "
                        f"{where} {fed}x{fed}: pass --allow-resolution-change to evaluate at "
                        f"{fed} px anyway")
    return fed, trained, [{"check": "resolution", "message":
                           f"evaluated at {fed} px, trained at {trained} px ({source}); "
                           "allowed by --allow-resolution-change"}]


def evaluation_crop(spec: ModelSpec, pipeline: str, asked: float | None) -> float | None:
    """The imagenet pipeline's center crop (fraction of the shorter side): --crop-ratio, else
    the one the checkpoint records (the run's data.val_crop_ratio), else 224/256; None for the
    cifar pipeline, which feeds images as stored."""
    if pipeline == "cifar":
        if asked is not None:
            raise UserError("--crop-ratio applies to the imagenet pipeline only; the cifar "
                            "pipeline feeds images as stored")
        return None
    return asked or spec.crop_ratio or DEFAULT_CROP_RATIO


def wanted_surrogate(attacks: list[str], surrogate: Path | None) -> bool:
    """Whether to load --surrogate: a transfer attack without one is refused before any work,
    a surrogate no attack uses is not loaded (with a note)."""
    transfer = [name for name in attacks if needs_surrogate(name)]
    if transfer and surrogate is None:
        raise UserError(f"{', '.join(transfer)} craft{'s' if len(transfer) == 1 else ''} "
                        "examples on a surrogate model: pass --surrogate PATH (a checkpoint in "
                        "any format --ckpt takes)")
    if surrogate is not None and not transfer:
        print(f"note: no transfer attack asked for; --surrogate {surrogate} is not used",
              file=sys.stderr)
    return bool(transfer)


@dataclass
class Evaluated:
    """A checkpoint loaded for evaluation and checked against the data."""

    model: TappedModel  # channels_last, on the device
    loaded: LoadedCheckpoint
    pipeline: str  # "cifar" or "imagenet"
    resolution: int  # what it is fed
    flags: list[dict[str, str]]
    about: dict[str, Any]  # the report's record of the file and the model


def load_evaluated(path: Path, arch: str, fmt: str, args: argparse.Namespace,
                   device: torch.device, labels: np.ndarray, pipeline: str,
                   resolution: int | None, role: str = "", **load: Any) -> Evaluated:
    """The checkpoint at `path` (--ckpt, or `role` "surrogate" for --surrogate), loaded and
    checked: it must predict every label and take the images at `resolution` (None: its
    own). `pipeline` "auto" follows the architecture. `load`: load_checkpoint's options."""
    loaded = load_checkpoint(arch, path, fmt, trust_pickle=args.trust_pickle, device=device,
                             **load)
    who = f"{role}: " if role else ""
    for note in loaded.notes:
        print(f"warning: {who}{note}", file=sys.stderr)
    model = loaded.model.to(memory_format=torch.channels_last)
    check_classes(labels, model.spec.num_classes, args.data, path)
    if pipeline == "auto":
        pipeline = default_pipeline(model.spec.arch)
    resolution, trained_at, flags = check_resolution(
        model.spec, pipeline, args.data, resolution, args.allow_resolution_change, path)
    if role:
        flags = [{"check": f"{role}_resolution", "message": f"{who}{flag['message']}"}
                 for flag in flags]
    about = {"path": path.resolve(), "sha256": sha256_file(path), "bytes": path.stat().st_size,
             "format": loaded.format,
             "model": asdict(model.spec) | {"trained_resolution": trained_at}}
    return Evaluated(model, loaded, pipeline, resolution, flags, about)


def normalization_probe(model: TappedModel, x: Tensor, y: Tensor, batch_size: int,
                        device: torch.device) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Clean accuracy on (x, y) with the model's normalization and with every other named
    one; a flag when another is clearly better (the wrong-normalization trap)."""
    batches = [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
               for i in range(0, len(y), batch_size)]
    accuracy, _ = accuracy_by_normalization(model, batches, NORMALIZATIONS)
    best = better_normalization(accuracy)
    if best is None:
        return accuracy, []
    mine = next(iter(accuracy))
    return accuracy, [{"check": "normalization", "message":
                       f"the model gets {accuracy[best]:.2%} of the first {len(y)} images right "
                       f"with normalization {best} but {accuracy[mine]:.2%} with {mine}, the "
                       f"one used: pass --normalization {best}"}]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                            formatter_class=DefaultsHelpFormatter)
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
                        help="allow full-pickle checkpoints, whole pickled models included "
                             "(they can run code); for --ckpt and --surrogate")
    parser.add_argument("--surrogate", type=Path, default=None,
                        help="checkpoint the transfer-* attacks craft their examples on (any "
                             "format --ckpt takes; its normalization from the file, else the "
                             "architecture's convention)")
    parser.add_argument("--surrogate-arch", choices=sorted(ARCHITECTURES), default=None,
                        help="the surrogate's architecture (needed unless it is fastibd's)")
    parser.add_argument("--surrogate-format", choices=FORMATS, default="auto",
                        help="the surrogate's checkpoint layout")
    parser.add_argument("--surrogate-width-mult", type=bounded(float, 1e-3, 64), default=1.0,
                        help="channel multiplier of a foreign surrogate's architecture")
    parser.add_argument("--attacks", type=parse_attacks, default=parse_attacks(DEFAULT_ATTACKS),
                        metavar="LIST", help=ATTACK_HELP)
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf",
                        help="threat model of every attack: linf, or l2 (FGM, PGD-L2, CW-L2, "
                             "AutoAttack and Square L2; no spsa)")
    # strings here, numbers in resolve_budgets: their range depends on --norm
    parser.add_argument("--eps", default=None,
                        help="budget in pixel space: Linf e.g. 8/255 or 0.031 (default 8/255); "
                             "L2 a radius, e.g. 0.5 (the default) or 3.0")
    parser.add_argument("--step-size", default=None,
                        help="PGD / CW step size (L2: the step's L2 length); default 2/255 "
                             "(Linf), eps/4 (L2)")
    parser.add_argument("--restarts", type=bounded(int, 1), default=1,
                        help="PGD / CW random restarts (worst case per example)")
    parser.add_argument("--square-queries", type=bounded(int, 1),
                        default=eval_attacks.SQUARE_QUERIES,
                        help="queries of the Square attack (aa uses it too)")
    parser.add_argument("--spsa-samples", type=bounded(int, 1), default=eval_attacks.SPSA_SAMPLES,
                        help="SPSA: random directions per iteration (each queried at +-delta)")
    parser.add_argument("--spsa-delta", type=bounded(float, 1e-6, 1),
                        default=eval_attacks.SPSA_DELTA,
                        help="SPSA: finite-difference step in pixel space")
    parser.add_argument("--spsa-iters", type=bounded(int, 1), default=eval_attacks.SPSA_ITERS,
                        help="SPSA: iterations (Adam steps)")
    parser.add_argument("--spsa-lr", type=bounded(float, 1e-6, 1), default=eval_attacks.SPSA_LR,
                        help="SPSA: Adam's learning rate")
    parser.add_argument("--spsa-batch", type=bounded(int, 1), default=eval_attacks.SPSA_BATCH,
                        help="SPSA: model inputs per forward pass at most (halved when CUDA "
                             "runs out of memory; the results do not depend on it)")
    parser.add_argument("--n", type=bounded(int, 1), default=None,
                        help="evaluate the first N examples (default: all)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=256,
                        help="examples attacked together (one forward / backward pass)")
    parser.add_argument("--seed", type=bounded(int, 0), default=0,
                        help="seed of the attacks' randomness (random starts, Square, SPSA)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="precision the model runs in under attack (bf16: autocast, "
                             "flagged in the report)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available, else the CPU")
    parser.add_argument("--pipeline", choices=("auto", "cifar", "imagenet"), default="auto",
                        help="cifar: images as stored; imagenet: center crop + resize; auto: by "
                             "the architecture's input size")
    parser.add_argument("--resolution", type=bounded(int, 8), default=None,
                        help="imagenet pipeline: input resolution (default: the one the "
                             "checkpoint was trained for, else the architecture's)")
    parser.add_argument("--crop-ratio", type=bounded(float, 0.01, 1), default=None,
                        help="imagenet pipeline: validation center crop, as a fraction of the "
                             "shorter side (default: the run's data.val_crop_ratio the "
                             "checkpoint records, else 224/256)")
    parser.add_argument("--allow-resolution-change", action="store_true",
                        help="evaluate at a resolution other than the checkpoint's (flagged)")
    parser.add_argument("--workers", type=bounded(int, 1), default=LoaderOptions.num_workers,
                        help="FFCV decoding threads")
    parser.add_argument("--sanity-n", type=bounded(int, 0), default=100,
                        help="images for the huge-eps PGD and normalization probes (0: skip "
                             "them; flagged)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", type=Path, default=Path("report.json"),
                        help="JSON report (its folder is made if missing)")
    return parser


@exit_on_user_error(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_budgets(parser, args)
    try:
        check_norm_supported(args.attacks, args.norm)
    except ValueError as err:
        raise UserError(str(err)) from None
    started = time.perf_counter()
    transfer = wanted_surrogate(args.attacks, args.surrogate)
    # before loading anything or attacking, not after hours of attacks
    writable_file(args.out, "--out", make_folder=True, example="report.json")
    device = resolve_device(args.device, "--device")
    labels = dataset_labels(args.data)  # cheap: fail on bad data before loading anything big
    evaluated = load_evaluated(args.ckpt, args.arch, args.format, args, device, labels,
                               args.pipeline, args.resolution,
                               normalization=args.normalization, width_mult=args.width_mult)
    model, loaded, pipeline = evaluated.model, evaluated.loaded, evaluated.pipeline
    spec, resolution, setup_flags = model.spec, evaluated.resolution, evaluated.flags
    num_classes = spec.num_classes
    try:
        check_classes_supported(args.attacks, num_classes)
    except ValueError as err:
        raise UserError(str(err)) from None
    n = len(labels) if args.n is None else min(args.n, len(labels))
    if args.n is not None and args.n > len(labels):
        print(f"note: {args.data} holds {len(labels)} examples; evaluating all of them",
              file=sys.stderr)
    if loaded.normalization_override:
        setup_flags.append({"check": "normalization_override",
                            "message": loaded.normalization_override})
    surrogate: nn.Module | None = None
    surrogate_about: dict[str, Any] | None = None
    if transfer:  # fed what the evaluated model is fed
        crafter = load_evaluated(args.surrogate, args.surrogate_arch, args.surrogate_format,
                                 args, device, labels, pipeline, resolution, role="surrogate",
                                 width_mult=args.surrogate_width_mult)
        surrogate, surrogate_about = crafter.model, crafter.about
        setup_flags += crafter.flags
    attacked: nn.Module = model
    if args.precision == "bf16":
        attacked = Autocast(model, torch.bfloat16)
        if surrogate is not None:  # crafted in the precision the attacks run in
            surrogate = Autocast(surrogate, torch.bfloat16)

    torch.manual_seed(args.seed)
    settings = Settings(args.eps, args.step_size, args.restarts, args.seed, num_classes,
                        args.square_queries, args.spsa_samples, args.spsa_delta,
                        args.spsa_iters, args.spsa_lr, args.spsa_batch, args.norm)
    crop_ratio = evaluation_crop(spec, pipeline, args.crop_ratio)
    batches = first_examples(args.data, pipeline, n, args.batch_size, device, resolution,
                             args.workers, crop_ratio)
    results, kept = run_attacks(attacked, batches, args.attacks, settings, total=n,
                                progress=not args.no_progress, keep=args.sanity_n,
                                surrogate=surrogate)
    huge = probe = None
    if args.sanity_n and kept is not None:
        huge = huge_eps_check(attacked, *kept, seed=args.seed, device=device,
                              batch_size=args.batch_size, norm=args.norm)
        probe, probe_flags = normalization_probe(model, *kept, args.batch_size, device)
        setup_flags += probe_flags
    else:
        setup_flags.append({"check": "checks_off", "message":
                            "--sanity-n 0: the huge-eps and normalization probes did not "
                            "run (the other checks did)"})
    recorded_clean = (loaded.recorded.get("holdout") or {}).get("clean_acc")
    flags = setup_flags + sanity_flags(results, huge, num_classes, args.precision, settings,
                                       recorded_clean)

    config = {key: value for key, value in vars(args).items() if key != "no_progress"}
    config |= {"pipeline": pipeline, "eps_255": args.eps * 255,
               "step_size_255": args.step_size * 255}
    context = {
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "config": config,
        "checkpoint": {key: evaluated.about[key] for key in ("path", "sha256", "bytes")},
        "model": evaluated.about["model"] | {"recorded": loaded.recorded},
        "surrogate": surrogate_about,
        "data": {"path": args.data.resolve(), "num_examples": results.n,
                 "dataset_size": len(labels), "num_classes": num_classes,
                 "resolution": resolution, "crop_ratio": crop_ratio,
                 "class_counts": class_counts(labels[:results.n], num_classes)},
        "environment": {"device": str(device), "torch": torch.__version__,
                        "pyautoattack": _version("pyautoattack"),
                        "python": platform.python_version()},
    }
    report = build_report(results, settings, huge, flags, context)
    report["sanity"]["normalization"] = probe
    report["time_s"] = time.perf_counter() - started
    print(format_table(report))
    try:
        args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    except OSError as err:
        raise UserError(f"cannot write {args.out}: {err.strerror}") from None
    print(f"report      {args.out}")
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())

"""Training-step throughput, a paper-style step against this project's: `python -m
fastibd.bench_step`.

One IBD step = teacher forward (with taps), the attack on the student, the student's
forward and backward through the full objective, and the SGD update: `fastibd.step.
TrainingStep`, the code the trainer runs. Two variants, side by side in one run:

  baseline  fp32, eager, NCHW, eager feature loss (how the paper's code trains)
  fastibd   this project's defaults on the device: on CUDA bf16 autocast, channels_last,
            torch.compile, fused Triton feature loss; on a CPU these resolve to fp32, eager
            and NCHW (see fastibd.train), so the two rows measure the same thing there.

Inputs are synthetic batches already on the device (data loading is measured separately by
`python -m fastibd.bench_data`). Without CUDA, tiny models and inputs keep it runnable.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastibd.cli import ArgumentParser, bounded
from fastibd.errors import UserError, exit_on_user_error
from fastibd.loss import FeatureDistillation
from fastibd.models import build_model
from fastibd.objective import AttackSettings, LossSettings, TrainingObjective
from fastibd.step import TrainingStep
from fastibd.train import resolve_compile, resolve_precision, training_memory_format


@dataclass(frozen=True)
class Workload:
    student: str
    teacher: str
    resolution: int
    batch_size: int
    attack_steps: int
    width_mult: float = 1.0  # applied to both models
    num_classes: int = 10


GPU_WORKLOADS = {
    "cifar": Workload("resnet18", "wrn34_10", 32, 128, 10),
    "imagenet160": Workload("resnet50", "resnet50", 160, 128, 1, num_classes=1000),
    "imagenet192": Workload("resnet50", "resnet50", 192, 128, 1, num_classes=1000),
    "imagenet224": Workload("resnet50", "resnet50", 224, 128, 1, num_classes=1000),
}
CPU_WORKLOADS = {
    "cifar-tiny": Workload("resnet18", "wrn34_10", 16, 16, 10, width_mult=1 / 8),
    "imagenet-tiny": Workload("resnet50", "resnet50", 32, 8, 1, width_mult=1 / 16,
                              num_classes=100),
}
VARIANTS = ("baseline", "fastibd")


@dataclass(frozen=True)
class Result:
    workload: str
    variant: str
    precision: str
    compiled: bool
    channels_last: bool
    feature_loss: str
    steps: int
    seconds: float
    images_per_s: float


def build_step(work: Workload, variant: str, device: torch.device) -> tuple[TrainingStep, dict]:
    """A TrainingStep as `variant` would run it, and how it is set up."""
    ours = variant == "fastibd"
    dtype = resolve_precision("auto", device) if ours else torch.float32
    compiled = resolve_compile("auto", device) if ours else False
    fmt = training_memory_format(device) if ours else torch.contiguous_format
    backend = "auto" if ours else "eager"
    student = build_model(work.student, work.num_classes, "none", work.width_mult)
    teacher = build_model(work.teacher, work.num_classes, "none", work.width_mult)
    student = student.to(device, memory_format=fmt)
    teacher = teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
    features = FeatureDistillation([c for c, _, _ in teacher.feature_shapes(work.resolution)],
                                   [c for c, _, _ in student.feature_shapes(work.resolution)],
                                   backend=backend).to(device)
    objective = TrainingObjective(student, LossSettings("ibd"), features)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.01, momentum=0.9,
                                weight_decay=5e-4)
    attack = AttackSettings(eps=8 / 255, step_size=2 / 255, steps=work.attack_steps)
    step_objective, attack_model, teacher_model = objective, student, teacher
    if compiled:
        step_objective = torch.compile(objective)
        attack_model = torch.compile(student)
        teacher_model = torch.compile(teacher)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    step = TrainingStep(step_objective, attack_model, student, teacher_model, True, "ibd",
                        attack, 1.0, optimizer, scaler, None, dtype,
                        torch.Generator(device).manual_seed(0))
    setup = {"precision": str(dtype).removeprefix("torch."), "compiled": compiled,
             "channels_last": fmt == torch.channels_last,
             "feature_loss": features.kernels.pool.__module__.rpartition(".")[2]}
    return step, setup


def measure(name: str, work: Workload, variant: str, device: torch.device, warmup: int,
            steps: int, progress: bool) -> Result:
    step, setup = build_step(work, variant, device)
    gen = torch.Generator(device).manual_seed(1)
    fmt = torch.channels_last if setup["channels_last"] else torch.contiguous_format
    x = torch.rand(work.batch_size, 3, work.resolution, work.resolution, device=device,
                   generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, work.num_classes, (work.batch_size,), device=device, generator=gen)
    bar = tqdm(total=warmup + steps, desc=f"{name} {variant}", unit="step", leave=False,
               disable=not progress, file=sys.stderr)
    for _ in range(warmup):  # compilation, autotuning and allocator warm-up happen here
        loss, _ = step(x, y)
        bar.update(1)
        if not torch.isfinite(loss):
            raise UserError(f"{name} {variant}: the loss is not finite")
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
        bar.update(1)
    _sync(device)
    seconds = time.perf_counter() - start
    bar.close()
    return Result(name, variant, setup["precision"], setup["compiled"], setup["channels_last"],
                  setup["feature_loss"], steps, seconds, steps * work.batch_size / seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(results: list[Result]) -> str:
    head = (f"{'workload':<14} {'variant':<9} {'precision':<9} {'compiled':<8} {'layout':<6} "
            f"{'feat loss':<9} {'img/s':>9} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    baseline = {r.workload: r.images_per_s for r in results if r.variant == "baseline"}
    for r in results:
        ratio = r.images_per_s / baseline[r.workload] if r.workload in baseline else float("nan")
        lines.append(f"{r.workload:<14} {r.variant:<9} {r.precision:<9} {str(r.compiled):<8} "
                     f"{'NHWC' if r.channels_last else 'NCHW':<6} {r.feature_loss:<9} "
                     f"{r.images_per_s:>9,.1f} {ratio:>7.2f}x")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fastibd.bench_step", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--workloads", default="",
                        help=f"comma-separated; CUDA: {', '.join(GPU_WORKLOADS)} (default all); "
                             f"CPU: {', '.join(CPU_WORKLOADS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated: baseline, fastibd")
    parser.add_argument("--warmup", type=bounded(int, 0), default=None,
                        help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--steps", type=bounded(int, 1), default=None,
                        help="timed steps (default 20 on CUDA, 2 on CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


@exit_on_user_error("fastibd.bench_step")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but this machine has no CUDA device")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    known = GPU_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    names = [n for n in args.workloads.split(",") if n] or list(known)
    variants = [v for v in args.variants.split(",") if v]
    for name in names:
        if name not in known:
            raise UserError(f"unknown workload {name!r} on {device.type}; choose from "
                            f"{', '.join(known)}")
    for variant in variants:
        if variant not in VARIANTS:
            raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    on_gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    steps = args.steps if args.steps is not None else (20 if on_gpu else 2)
    results = [measure(name, known[name], variant, device, warmup, steps, not args.no_progress)
               for name in names for variant in variants]
    print(table(results))
    print(f"(device {torch.cuda.get_device_name(device) if on_gpu else 'cpu'}, torch "
          f"{torch.__version__}, {warmup} warm-up + {steps} timed steps, synthetic inputs "
          "on the device)")
    if args.json:
        report = {"device": str(device), "torch": torch.__version__, "warmup": warmup,
                  "workloads": {n: asdict(known[n]) for n in names},
                  "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

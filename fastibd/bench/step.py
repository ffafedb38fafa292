"""Training-step throughput, a paper-style step against this project's: `python -m
fastibd.bench_step`.

One IBD step = teacher forward (with taps), the attack on the student, the student's
forward and backward through the full objective, and the SGD update: `fastibd.method.step.
TrainingStep`, the code the trainer runs. Two variants, side by side in one run:

  baseline  fp32, eager, NCHW, eager feature loss; with --data loaders, a torchvision
            DataLoader (ImageFolder, augmentation in worker processes): how the paper's
            code trains
  fastibd   this project's defaults on the device: on CUDA bf16 autocast, channels_last,
            torch.compile, fused Triton feature loss; on a CPU these resolve to fp32, eager
            and NCHW (see fastibd.device), so the two steps are the same computation there.
            With --data loaders, the trainer's FFCV pipeline

--data loaders writes synthetic images of the workload's shape once (32x32 PNGs / 300-500 px
JPEGs, as a folder for torchvision and a .beton for FFCV) and times loading + step together,
with the same augmentation on both sides (CIFAR: pad-4 crop + flip; ImageNet: random resized
crop + flip). --data device feeds one synthetic batch already on the device, timing the step
alone (the mode for machines without ffcv; FFCV's own speed: `python -m fastibd.bench_data`).
--data auto picks loaders when ffcv is installed. Without CUDA, tiny models keep it runnable.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from fastibd.bench.data import LoadSetup, TorchvisionBatches, prepare
from fastibd.cli import ArgumentParser, bounded, comma_list, writable_file
from fastibd.device import Runtime, device_name, resolve_device, resolve_runtime, synchronize
from fastibd.errors import UserError, exit_on_user_error
from fastibd.method.attacks import AttackSettings
from fastibd.method.modes import LossSettings
from fastibd.method.step import TrainingStep, build_step
from fastibd.models import build_model
from kernels import reference


@dataclass(frozen=True)
class Workload:
    dataset: str  # cifar or imagenet: the shape of the images --data loaders writes
    student: str
    teacher: str
    resolution: int
    batch_size: int
    attack_steps: int
    width_mult: float = 1.0  # applied to both models
    num_classes: int = 10


GPU_WORKLOADS = {
    "cifar": Workload("cifar", "resnet18", "wrn34_10", 32, 128, 10),
    "imagenet160": Workload("imagenet", "resnet50", "resnet50", 160, 128, 1, num_classes=1000),
    "imagenet192": Workload("imagenet", "resnet50", "resnet50", 192, 128, 1, num_classes=1000),
    "imagenet224": Workload("imagenet", "resnet50", "resnet50", 224, 128, 1, num_classes=1000),
}
CPU_WORKLOADS = {
    "cifar-tiny": Workload("cifar", "resnet18", "wrn34_10", 32, 16, 10, width_mult=1 / 8),
    "imagenet-tiny": Workload("imagenet", "resnet50", "resnet50", 32, 8, 1, width_mult=1 / 16,
                              num_classes=100),
}
VARIANTS = ("baseline", "fastibd")
DATA_MODES = ("auto", "device", "loaders")
LOADER_OF = {"baseline": "torchvision", "fastibd": "ffcv"}


@dataclass(frozen=True)
class Result:
    workload: str
    variant: str
    data: str  # device (synthetic, on the device), torchvision or ffcv
    precision: str
    compiled: bool
    channels_last: bool
    feature_loss: str
    steps: int
    seconds: float
    images_per_s: float


def workload_step(work: Workload, variant: str,
                  device: torch.device) -> tuple[TrainingStep, Runtime]:
    """The TrainingStep `variant` runs (fastibd.method.step.build_step, as the trainer), and
    where and how it computes."""
    if variant == "fastibd":
        runtime = resolve_runtime(str(device), "auto", "auto", "default", "--device")
    else:
        runtime = Runtime(device, torch.float32, torch.contiguous_format, compiled=False)
    place = dict(device=device, memory_format=runtime.memory_format)
    student = build_model(work.student, work.num_classes, "none", work.width_mult).to(**place)
    teacher = build_model(work.teacher, work.num_classes, "none", work.width_mult).to(**place)
    teacher = teacher.eval().requires_grad_(False)
    loss = LossSettings("ibd", backend="auto" if variant == "fastibd" else "eager")
    step = build_step(student, teacher, loss,
                      AttackSettings(eps=8 / 255, step_size=2 / 255, steps=work.attack_steps),
                      runtime, resolution=work.resolution,
                      make_optimizer=lambda module: torch.optim.SGD(
                          module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4),
                      attack_rng=torch.Generator(device).manual_seed(0))
    return step, runtime


# ----------------------------------------------------------------------------- inputs


def device_batches(work: Workload, device: torch.device,
                   fmt: torch.memory_format) -> Iterator[tuple[Tensor, Tensor]]:
    """The same synthetic batch, already on the device, forever."""
    gen = torch.Generator(device).manual_seed(1)
    x = torch.rand(work.batch_size, 3, work.resolution, work.resolution, device=device,
                   generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, work.num_classes, (work.batch_size,), device=device, generator=gen)
    return itertools.repeat((x, y))


def loader_setup(work: Workload, device: torch.device, workers: int,
                 progress: bool) -> LoadSetup:
    """How fastibd.bench_data's writers and loaders read this workload's images."""
    return LoadSetup(workers=workers, device=str(device), resolution=work.resolution,
                     progress=progress)


def torchvision_batches(root: Path, work: Workload, setup: LoadSetup,
                        fmt: torch.memory_format) -> Iterable[tuple[Tensor, Tensor]]:
    return TorchvisionBatches(root, work.dataset, work.batch_size, setup, fmt)


def ffcv_batches(root: Path, work: Workload, setup: LoadSetup,
                 fmt: torch.memory_format) -> Iterator[tuple[Tensor, Tensor]]:
    """The trainer's pipeline (fastibd.data.make_loader): FFCV decodes; CIFAR's crop and flip
    then run on the device, ImageNet's random resized crop inside FFCV."""
    from fastibd.data import LoaderOptions, make_loader

    options = LoaderOptions(batch_size=work.batch_size, device=torch.device(setup.device),
                            num_workers=setup.workers, seed=setup.seed)
    loader = make_loader(root / "train.beton", work.dataset, "train", options,
                         resolution=work.resolution)
    for x, y in loader:
        yield x.contiguous(memory_format=fmt), y


# ----------------------------------------------------------------------------- timing


def measure(name: str, work: Workload, variant: str, device: torch.device, warmup: int,
            steps: int, progress: bool, data_root: Path | None = None,
            setup: LoadSetup | None = None) -> Result:
    """`warmup` untimed steps, then `steps` timed ones. With `data_root` the batches come
    from the variant's loader and loading is timed with the step."""
    step, runtime = workload_step(work, variant, device)
    fmt = runtime.memory_format
    if data_root is None:
        data, batches = "device", device_batches(work, device, fmt)
    else:
        data = LOADER_OF[variant]
        make = torchvision_batches if data == "torchvision" else ffcv_batches
        batches = iter(make(data_root, work, setup, fmt))
    bar = tqdm(total=warmup + steps, desc=f"{name} {variant}", unit="step", leave=False,
               disable=not progress, file=sys.stderr)
    # Compilation, autotuning, FFCV's pipeline compilation, worker start-up and allocator
    # warm-up all happen in the warm-up steps.
    for x, y in itertools.islice(batches, warmup):
        loss, _ = step(x, y)
        bar.update(1)
        if not torch.isfinite(loss):
            raise UserError(f"{name} {variant}: the loss is not finite")
    synchronize(device)
    start = time.perf_counter()
    timed = 0
    for x, y in itertools.islice(batches, steps):
        step(x, y)
        timed += 1
        bar.update(1)
    synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    if timed != steps:
        raise RuntimeError(f"{name} {variant}: the loader gave {timed} of {steps} batches")
    ops = step.objective.features.kernels
    feature_loss = "eager" if ops.feature_terms is reference.feature_terms else "fused"
    return Result(name, variant, data, runtime.precision, runtime.compiled,
                  fmt == torch.channels_last, feature_loss, steps, seconds,
                  steps * work.batch_size / seconds)


def write_data(work_dir: Path, work: Workload, count: int, setup: LoadSetup) -> Path:
    """`count` synthetic images of the workload's shape as a folder and a .beton."""
    return prepare(work_dir, work.dataset, count, setup)


HEADER = (f"{'workload':<14} {'variant':<9} {'data':<11} {'precision':<9} {'compiled':<8} "
          f"{'layout':<6} {'feat loss':<9} {'img/s':>9} {'speed-up':>8}")


def row(r: Result, baseline: float | None) -> str:
    ratio = r.images_per_s / baseline if baseline else float("nan")
    return (f"{r.workload:<14} {r.variant:<9} {r.data:<11} {r.precision:<9} "
            f"{str(r.compiled):<8} {'NHWC' if r.channels_last else 'NCHW':<6} "
            f"{r.feature_loss:<9} {r.images_per_s:>9,.1f} {ratio:>7.2f}x")


# ----------------------------------------------------------------------------- main


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fastibd.bench_step",
                            description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when available, else the CPU (which has its own "
                             "workloads)")
    parser.add_argument("--workloads", default="",
                        help=f"comma-separated; CUDA: {', '.join(GPU_WORKLOADS)} (default all); "
                             f"CPU: {', '.join(CPU_WORKLOADS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated: baseline, fastibd")
    parser.add_argument("--data", choices=DATA_MODES, default="auto",
                        help="loaders: time data loading too (needs ffcv); device: synthetic "
                             "batches on the device; auto: loaders if ffcv is installed")
    parser.add_argument("--workers", type=bounded(int, 1), default=None,
                        help="loader workers with --data loaders (default 8 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=bounded(int, 0), default=None,
                        help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--steps", type=bounded(int, 1), default=None,
                        help="timed steps (default 20 on CUDA, 2 on CPU)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the results here (updated after each row)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (the table rows still print)")
    return parser


def resolve_data(mode: str) -> str:
    has_ffcv = importlib.util.find_spec("ffcv") is not None
    if mode == "auto":
        return "loaders" if has_ffcv else "device"
    if mode == "loaders" and not has_ffcv:
        raise UserError("--data loaders needs ffcv, which is not installed here; use "
                        "--data device")
    return mode


@exit_on_user_error("fastibd.bench_step")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json is not None:  # before measuring, not after
        writable_file(args.json, "--json", example="step.json")
    device = resolve_device(args.device, "--device")
    on_gpu = device.type == "cuda"
    known = GPU_WORKLOADS if on_gpu else CPU_WORKLOADS
    names = comma_list(args.workloads) or list(known)
    variants = comma_list(args.variants)
    for name in names:
        if name not in known:
            raise UserError(f"unknown workload {name!r} on {device.type}; choose from "
                            f"{', '.join(known)}")
    for variant in variants:
        if variant not in VARIANTS:
            raise UserError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    data = resolve_data(args.data)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    steps = args.steps if args.steps is not None else (20 if on_gpu else 2)
    workers = args.workers or (8 if on_gpu else 2)
    if data == "loaders" and warmup == 0:
        raise UserError("--data loaders needs --warmup >= 1 (FFCV compiles its pipeline and "
                        "the DataLoader starts its workers on the first batch)")
    progress = not args.no_progress
    inputs = ("synthetic inputs on the device" if data == "device" else
              f"synthetic images through the loaders, {workers} workers")
    report = {"device": str(device), "torch": torch.__version__, "warmup": warmup,
              "data": data, "workers": workers if data == "loaders" else None,
              "workloads": {n: asdict(known[n]) for n in names}, "results": []}
    results: list[Result] = []

    def record(result: Result) -> None:
        """Print each row when measured and keep the JSON current: a long GPU run that is
        stopped still leaves what it measured."""
        results.append(result)
        baseline = {r.workload: r.images_per_s for r in results if r.variant == "baseline"}
        print(row(result, baseline.get(result.workload)), flush=True)
        if args.json:
            report["results"].append(asdict(result))
            try:
                args.json.write_text(json.dumps(report, indent=2))
            except OSError as err:
                raise UserError(f"cannot write {args.json}: {err.strerror}") from None

    print(HEADER)
    print("-" * len(HEADER), flush=True)
    for name in names:
        work = known[name]
        if data == "device":
            for variant in variants:
                record(measure(name, work, variant, device, warmup, steps, progress))
            continue
        work_dir = Path(tempfile.mkdtemp(prefix="fastibd-bench-step-"))
        try:  # one epoch holds exactly the warm-up and timed batches of one variant
            setup = loader_setup(work, device, workers, progress)
            root = write_data(work_dir, work, (warmup + steps) * work.batch_size, setup)
            for variant in variants:
                record(measure(name, work, variant, device, warmup, steps, progress, root,
                               setup))
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"(device {device_name(device)}, torch "
          f"{torch.__version__}, {warmup} warm-up + {steps} timed steps, {inputs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

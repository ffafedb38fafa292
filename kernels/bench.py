"""Throughput of the feature-distillation loss: eager reference vs torch.compile vs fused.

    python -m kernels.bench                      # all GPU configs, all providers
    python -m kernels.bench --configs cifar-b128 --providers eager,fused --out bench-out
    python -m kernels.bench --help

What is timed (per config, provider and mode) is the hot path of FeatureDistillation on
synthetic bf16 channels_last taps already on the device:

    maps, gaps = pool(every tap)           (teacher taps detached, student taps require grad)
    loss = weighted_sum(pair_distances(teacher maps, student maps), attn)
           + sum_k mean_b <gap_k, v_k>

with a fixed random attention tensor attn [B, n, m] (rows sum to 1) and fixed random vectors
v_k standing in for the attention MLPs (so no provider can drop the GAP half of `pool`).
`--loss module` times the real fastibd.method.loss.FeatureDistillation instead (backend eager or
fused; its attention MLPs included). Modes: "fwd" (the loss, autograd recording as in
training) and "fwd+bwd" (plus loss.backward() into the student taps).

Reported: median ms (triton.testing.do_bench on CUDA), effective GB/s against the bytes floor
(fwd: every tap read once; fwd+bwd: plus the student taps read again and their gradients
written once), that as a fraction of this card's copy bandwidth measured in the same run
(a 1 GiB device-to-device copy, read + write bytes), and the peak memory beyond the inputs.
Without CUDA the script says so and times small CPU shapes with time.perf_counter instead.
Results: a table on stdout, results.csv and results.png (matplotlib, if installed) in --out.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from fastibd.cli import ArgumentParser, choice_list, writable_directory
from fastibd.device import device_name
from fastibd.errors import UserError, exit_on_user_error
from kernels import common, fused, plan, pool, reference

# ----------------------------------------------------------------------------- configs

Tap = plan.Tap


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    teacher: tuple[Tap, ...]
    student: tuple[Tap, ...]
    batch: int


GPU_CONFIGS = {
    c.name: c
    for c in (
        Config("cifar-b128", "WRN-34-10 -> ResNet-18, CIFAR 32 px", plan.WRN34_10_CIFAR,
               plan.RESNET18_CIFAR, 128),
        Config("cifar-b512", "WRN-34-10 -> ResNet-18, CIFAR 32 px", plan.WRN34_10_CIFAR,
               plan.RESNET18_CIFAR, 512),
        Config("imagenet224-b256", "ResNet-50 -> ResNet-50, ImageNet 224 px",
               plan.resnet50_taps(224), plan.resnet50_taps(224), 256),
        Config("imagenet160-b256", "ResNet-50 -> ResNet-50, ImageNet 160 px",
               plan.resnet50_taps(160), plan.resnet50_taps(160), 256),
    )
}


def _shrink(taps: tuple[Tap, ...], divisor: int, multiple: int = 1) -> tuple[Tap, ...]:
    """The taps with their channels divided by `divisor`, rounded up to a multiple of
    `multiple` (at least one multiple)."""
    return tuple((multiple * math.ceil(c / (divisor * multiple)), s) for c, s in taps)


# Same tap structure (so the same n x m pairs and resizes), channels and batch cut down so
# the eager reference runs in seconds on a small CPU.
CPU_CONFIGS = {
    c.name: c
    for c in (
        Config("cifar-cpu", "WRN-34-10 -> ResNet-18 taps, channels / 16", _shrink(
            plan.WRN34_10_CIFAR, 16), _shrink(plan.RESNET18_CIFAR, 16), 8),
        Config("imagenet160-cpu", "ResNet-50 -> ResNet-50 taps at 160 px, channels / 32",
               _shrink(plan.resnet50_taps(160), 32), _shrink(plan.resnet50_taps(160), 32), 2),
    )
}

PROVIDERS = ("eager", "compile", "fused", "fused+compile")
DEFAULT_GPU_PROVIDERS = ("eager", "compile", "fused")
DEFAULT_CPU_PROVIDERS = ("eager", "fused")
MODES = ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------- losses


@dataclass
class Inputs:
    teacher: list[Tensor]
    student: list[Tensor]  # leaves with requires_grad
    attn: Tensor  # [B, n, m]
    probe: Tensor  # [sum C]: one vector over all GAPs, teacher taps first


def make_inputs(config: Config, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> Inputs:
    """Post-ReLU-like random taps (non-negative), channels_last, on the device."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def tap(c: int, s: int, grad: bool) -> Tensor:
        x = torch.randn((config.batch, c, s, s), generator=gen, device=device, dtype=dtype)
        x = x.relu_().to(memory_format=torch.channels_last)
        return x.requires_grad_(grad)

    teacher = [tap(c, s, False) for c, s in config.teacher]
    student = [tap(c, s, True) for c, s in config.student]
    logits = torch.randn((config.batch, len(teacher), len(student)), generator=gen,
                         device=device)
    channels = sum(c for c, _ in (*config.teacher, *config.student))
    probe = torch.randn((channels,), generator=gen, device=device) / channels
    return Inputs(teacher, student, logits.softmax(-1), probe)


def gaps_and_distances(ops, x: Inputs) -> tuple[Tensor, Tensor, Tensor]:
    """(teacher GAPs, student GAPs, d): the ops as FeatureDistillation calls them, one
    feature_terms call for all taps."""
    return ops.feature_terms(x.teacher, x.student)


def ops_loss(ops) -> Callable[[Inputs], Tensor]:
    """The hot path on a kernel module with the reference signatures (reference or fused)."""

    def loss(x: Inputs) -> Tensor:
        t_gaps, s_gaps, d = gaps_and_distances(ops, x)
        # every GAP reaches the loss (as the attention's inputs do), through one probe
        gaps = torch.cat([t_gaps, s_gaps], dim=1)
        return ops.weighted_sum(d, x.attn) + (gaps @ x.probe).mean()

    return loss


def module_loss(config: Config, backend: str, device: torch.device) -> Callable[[Inputs], Tensor]:
    """The real FeatureDistillation (attention MLPs included) on the chosen backend."""
    from fastibd.method.loss import FeatureDistillation

    torch.manual_seed(0)  # the same attention weights for every provider
    module = FeatureDistillation([c for c, _ in config.teacher], [c for c, _ in config.student],
                                 dim=128, backend=backend).to(device)

    def loss(x: Inputs) -> Tensor:
        return module(x.teacher, x.student)

    return loss


def build_loss(provider: str, kind: str, config: Config,
               device: torch.device) -> Callable[[Inputs], Tensor]:
    use_fused = provider.startswith("fused")
    if kind == "module":
        fn = module_loss(config, "fused" if use_fused else "eager", device)
    else:
        fn = ops_loss(fused if use_fused else reference)
    if provider.endswith("compile"):
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    return fn


# ------------------------------------------------------------------------- correctness

# Largest |fused - reference| of a student gradient, relative to the largest |reference|:
# the gradients are returned in the taps' dtype, so about one rounding of that dtype.
GRAD_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def check_fused(config: Config, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Fused vs reference on this config's tap shapes at batch 4 (fresh random taps): the
    loss and every student-tap gradient. Returns (ok, one-line summary)."""
    small = replace(config, batch=min(config.batch, 4))
    x = make_inputs(small, device, dtype, seed=1)
    want = ops_loss(reference)(x)
    want_grads = torch.autograd.grad(want, x.student)
    got = ops_loss(fused)(x)
    got_grads = torch.autograd.grad(got, x.student)
    loss_err = ((got - want).abs() / want.abs().clamp_min(1e-30)).item()
    grad_err = max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)
                    ).item() for g, w in zip(got_grads, want_grads, strict=True))
    ok = loss_err <= 1e-4 and grad_err <= GRAD_TOLERANCE[dtype]
    verdict = "ok" if ok else "FAILED"
    return ok, (f"check {config.name} (batch {small.batch}): loss rel err {loss_err:.2e}, "
                f"max student grad rel err {grad_err:.2e} -> {verdict}")


# ------------------------------------------------------------------------------- timing


@dataclass
class Row:
    config: str
    description: str
    batch: int
    provider: str
    mode: str
    median_ms: float
    floor_bytes: int
    gbps: float
    copy_fraction: float  # nan on CPU
    peak_extra_mib: float  # nan on CPU
    device: str
    model_ms: float = math.nan  # fused on CUDA: the plan's bytes at the measured copy bandwidth


def time_cpu(fn: Callable[[], object], reps: int) -> float:
    """Median wall time in ms of fn() after one warm-up call (CPU mode)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_cuda(fn: Callable[[], object], grads: Sequence[Tensor], warmup: int, rep: int
              ) -> tuple[float, float]:
    """(median ms via triton.testing.do_bench, peak MiB allocated beyond what existed before)."""
    from triton.testing import do_bench

    fn()  # compile / autotune outside the timed region
    fn()
    for g in grads:
        g.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for g in grads:
        g.grad = None
    ms = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(grads), return_mode="median")
    return float(ms), peak


def copy_bandwidth_gbps(device: torch.device, warmup: int, rep: int) -> float:
    """This card's device-to-device copy bandwidth (read + write bytes / time), 1 GiB."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep, return_mode="median")
    src = dst = None  # free the 2 GiB before the configs run
    torch.cuda.empty_cache()
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def run_config(config: Config, providers: Sequence[str], modes: Sequence[str], kind: str,
               device: torch.device, dtype: torch.dtype, copy_gbps: float, args) -> list[Row]:
    rows = []
    inputs = make_inputs(config, device, dtype)
    floor = {mode: floor_bytes(config, dtype, mode) for mode in MODES}
    # The plan's bytes at this card's copy bandwidth (CUDA only): one capture per mode.
    model_ms = ({mode: plan.projection_ms(planned_launches(config, dtype, mode), copy_gbps)
                 for mode in modes} if copy_gbps and kind == "ops" else {})
    for provider in providers:
        if provider.endswith("compile"):
            torch._dynamo.reset()  # one compile per config; no cache-limit surprises
        loss = build_loss(provider, kind, config, device)
        for mode in modes:
            if mode == "fwd":
                def fn(loss=loss):
                    return loss(inputs)
            else:
                def fn(loss=loss):
                    loss(inputs).backward()
            try:
                if device.type == "cuda":
                    ms, peak = time_cuda(fn, inputs.student, args.warmup, args.rep)
                else:
                    ms, peak = time_cpu(fn, args.cpu_reps), math.nan
            except torch.cuda.OutOfMemoryError:
                print(f"  {config.name} {provider} {mode}: out of memory, skipped",
                      file=sys.stderr)
                torch.cuda.empty_cache()
                continue
            finally:
                for s in inputs.student:
                    s.grad = None
            gbps = floor[mode] / (ms * 1e-3) / 1e9
            model = model_ms.get(mode, math.nan) if provider.startswith("fused") else math.nan
            rows.append(Row(config.name, config.description, config.batch, provider, mode, ms,
                            floor[mode], gbps, gbps / copy_gbps if copy_gbps else math.nan,
                            peak, str(device), model))
            print(f"  {config.name:18s} {provider:14s} {mode:8s} {ms:10.3f} ms", flush=True)
    return rows


# ------------------------------------------------------------------- pool tiles (GPU)

def tile_rows(config: Config, device: torch.device, dtype: torch.dtype, copy_gbps: float,
              time_ms: Callable[[Callable[[], object]], float]) -> list[tuple[str, ...]]:
    """Per tile variant, the pool work of one loss: the forward of both sides' taps and the
    backward of the student's, each timed with `time_ms`, and GB/s against the bytes any
    variant must move (the forward reads every tap; the backward reads the student's and
    writes their gradients); launches and lane use (forward) from one captured call."""
    x = make_inputs(config, device, dtype)
    teacher, student = x.teacher, [z.detach() for z in x.student]

    def size(taps: Sequence[Tensor]) -> int:
        return sum(z.numel() * z.element_size() for z in taps)

    floors = (size(teacher) + size(student), 2 * size(student))
    rows = []
    for name, options in pool.TILE_VARIANTS.items():
        cells = []
        for fn, floor in zip(plan.pool_work(teacher, student, options), floors, strict=True):
            launches = plan.captured(fn)
            ms = time_ms(fn)
            cells.append((launches, ms, floor / (ms * 1e-3) / 1e9))
        (fwd_launches, *_), (bwd_launches, *_) = cells
        uses = [plan.tile_use(launch) for launch in fwd_launches]  # (0, 0): GAP reduction
        slots, data = sum(u[0] for u in uses), sum(u[1] for u in uses)
        rows.append((config.name, name, f"{len(fwd_launches)}+{len(bwd_launches)}",
                     f"{data / slots:.0%}",
                     *(cell for _, ms, gbps in cells for cell in (
                         f"{ms:.3f}", f"{gbps:.3g}", f"{100 * gbps / copy_gbps:.1f}"))))
    return rows


def tile_report(configs: Sequence[Config], device: torch.device, dtype: torch.dtype,
                copy_gbps: float, warmup: int, rep: int) -> str:
    """tile_rows of every config, timed on the GPU (do_bench, median)."""
    from triton.testing import do_bench

    def time_ms(fn: Callable[[], object]) -> float:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    head = ("config", "tiles", "launches fwd+bwd", "lane use fwd", "fwd ms", "fwd GB/s",
            "fwd % copy", "bwd ms", "bwd GB/s", "bwd % copy")
    lines = [head]
    for config in configs:
        lines += tile_rows(config, device, dtype, copy_gbps, time_ms)
        torch.cuda.empty_cache()
    return aligned(lines)


# ------------------------------------------------------------------------------ output


def format_table(rows: Sequence[Row]) -> str:
    head = ("config", "B", "provider", "mode", "median ms", "model ms", "floor MB", "GB/s",
            "% copy BW", "peak extra MiB")
    lines = [head]
    for r in rows:
        lines.append((r.config, str(r.batch), r.provider, r.mode, f"{r.median_ms:.3f}",
                      "-" if math.isnan(r.model_ms) else f"{r.model_ms:.3f}",
                      f"{r.floor_bytes / 1e6:.1f}", f"{r.gbps:.3g}",
                      "-" if math.isnan(r.copy_fraction) else f"{100 * r.copy_fraction:.1f}",
                      "-" if math.isnan(r.peak_extra_mib) else f"{r.peak_extra_mib:.0f}"))
    return aligned(lines)


def aligned(lines: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns under a header and a rule."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


# ------------------------------------------------------------ the plan, without a GPU

FORWARD_KERNELS = ("_pool_fwd_kernel", "_gap_reduce_kernel", "_pairs_fwd_kernel")


def planned_launches(config: Config, dtype: torch.dtype, mode: str) -> list[plan.Launch]:
    """The fused loss's launches for `config` at its real batch (meta tensors): the
    forward ones for "fwd", all of them for "fwd+bwd"."""
    launches = plan.loss_launches(plan.shapes(config.teacher), plan.shapes(config.student),
                                  config.batch, dtype, "channels_last")
    if mode == "fwd":
        launches = [x for x in launches if x.kernel.__name__ in FORWARD_KERNELS]
    return launches


def floor_bytes(config: Config, dtype: torch.dtype, mode: str) -> int:
    """Every tap read once (fwd); plus the student taps read again and their gradients
    written (fwd+bwd): what any implementation must move."""
    size = torch.empty((), dtype=dtype).element_size() * config.batch
    teacher = sum(c * s * s for c, s in config.teacher) * size
    student = sum(c * s * s for c, s in config.student) * size
    return teacher + student if mode == "fwd" else teacher + 3 * student


def model_report(configs: Sequence[Config], dtype: torch.dtype) -> str:
    """Per config and mode: launches, bytes planned vs the floor, programs per SM of each
    kernel, and the bandwidth-bound time on each card of plan.CARDS (a projection)."""
    cards = list(plan.CARDS)
    sms = plan.CARDS[cards[0]][0]  # programs per SM of the first card
    head = ("config", "mode", "kernel", "launches", "MB", "programs", "programs/SM",
            "lane use", *(f"{card} ms" for card in cards))
    blocks = []
    for config in configs:
        lines = [head]
        for mode in MODES:
            launches = planned_launches(config, dtype, mode)
            for k in plan.summarize(launches):
                spread = (str(k.min_programs) if k.min_programs == k.max_programs
                          else f"{k.min_programs}-{k.max_programs}")
                lines.append((config.name, mode, k.kernel, str(k.launches),
                              f"{k.bytes / 1e6:.1f}", spread,
                              f"{k.min_programs / sms:.2g}-{k.max_programs / sms:.2g}",
                              "" if k.lane_use is None else f"{k.lane_use:.0%}",
                              *("" for _ in cards)))
            planned = sum(plan.launch_bytes(x) for x in launches)
            floor = floor_bytes(config, dtype, mode)
            lines.append((config.name, mode, f"all (floor {floor / 1e6:.1f} MB, "
                          f"{planned / floor:.3f}x)", str(len(launches)),
                          f"{planned / 1e6:.1f}", "", "", "",
                          *(f"{plan.projection_ms(launches, bw):.3f}"
                            for _, bw in plan.CARDS.values())))
        blocks.append(aligned(lines))
    return "\n\n".join(blocks)


def ops_only(ops) -> Callable[[Inputs], tuple[list[Tensor], list[Tensor]]]:
    """The op call alone (feature_terms: both pools, the pair distances) and the backward of
    its outputs: the ops' own host work, without the loss terms around them."""

    def run(x: Inputs) -> tuple[list[Tensor], list[Tensor]]:
        _, s_gaps, d = gaps_and_distances(ops, x)
        return [d, s_gaps], [x.attn, torch.ones_like(s_gaps)]

    return run


# The --host column that leaves out this CPU's own arithmetic: the loss's torch ops around
# the op (the weighted sum, the benchmark's GAP probe) really compute here, on [2, sum C]
# GAPs (30208 values at ImageNet's structure), which on a GPU is device work, not host work.
# With the channels divided by this (rounded up to a multiple of 16, so every tap keeps its
# alignment and the pool launches their grouping) the taps, launches and plans keep their
# structure and the op's host work stays the same (its tables are cached per signature),
# while that arithmetic shrinks ~16-fold.
HOST_CHANNEL_DIVISOR = 16


def host_inputs(config: Config, dtype: torch.dtype, channel_divisor: int = 1
                ) -> Callable[[], Inputs]:
    """Fresh CPU inputs at the config's tap structure with batch 2, for the host-side
    measurements (the host work does not depend on the batch, nor on the channels:
    `channel_divisor` > 1 divides them, see HOST_CHANNEL_DIVISOR)."""
    config = replace(config, batch=2)
    if channel_divisor > 1:  # multiples of 16: the alignment the pool launches group by
        config = replace(config, teacher=_shrink(config.teacher, channel_divisor, 16),
                         student=_shrink(config.student, channel_divisor, 16))
    return lambda: make_inputs(config, torch.device("cpu"), dtype)


def host_report(configs: Sequence[Config], dtype: torch.dtype, reps: int) -> str:
    """Host ms of the fused loss per config with every kernel stubbed out, on this CPU, at
    the config's tap structure (host_inputs): the loss (ops_loss), the loss on taps with
    fewer channels (HOST_CHANNEL_DIVISOR), the ops alone (ops_only) and the no-op floor;
    first the loss with glibc's malloc as it is (the last column), then the others with
    freed memory kept for reuse, as on a GPU, measured side by side (one call of each in
    turn)."""
    plain = [plan.host_ms(ops_loss(fused), host_inputs(config, dtype), reps)[1]
             for config in configs]
    head = ("config", "taps", "launches", "host ms fwd", "host ms fwd+bwd",
            f"fwd+bwd, C / {HOST_CHANNEL_DIVISOR}", "ops alone fwd+bwd", "no-op op fwd+bwd",
            "fwd+bwd, malloc as is")
    lines = [head]
    with plan.freed_memory_kept() as kept:
        for config, as_is in zip(configs, plain, strict=True):
            full, narrow = host_inputs(config, dtype), host_inputs(
                config, dtype, HOST_CHANNEL_DIVISOR)
            (fwd, both, launches), (_, narrowed, same), (_, alone, _), (_, floor, _) = \
                plan.host_ms_side_by_side([(ops_loss(fused), full), (ops_loss(fused), narrow),
                                           (ops_only(fused), full), (plan.no_op_loss, full)],
                                          reps)
            if same != launches:  # the column's premise (HOST_CHANNEL_DIVISOR)
                raise RuntimeError(f"{config.name}: fewer channels made {same} launches, "
                                   f"not {launches}")
            lines.append((config.name, f"{len(config.teacher)}+{len(config.student)}",
                          str(launches), f"{fwd:.3f}", f"{both:.3f}", f"{narrowed:.3f}",
                          f"{alone:.3f}", f"{floor:.3f}", f"{as_is:.3f}"))
    heap = "kept" if kept else "not kept (glibc only)"
    return (f"(freed CPU memory {heap} for reuse, as CUDA's caching allocator does; C / "
            f"{HOST_CHANNEL_DIVISOR}: the same taps and launches with ~1/{HOST_CHANNEL_DIVISOR}"
            " of the channels, where the torch ops around the op, device work on a GPU, "
            f"compute ~{HOST_CHANNEL_DIVISOR}x less on this CPU; no-op op: an "
            "autograd.Function over the same taps that computes nothing, the autograd "
            "engine's own share)\n" + aligned(lines))


def write_csv(rows: Sequence[Row], path: Path) -> None:
    fields = list(Row.__dataclass_fields__)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for r in rows:
            writer.writerow([getattr(r, k) for k in fields])


def write_plot(rows: Sequence[Row], path: Path, title: str) -> bool:
    """Grouped bars: median ms per (config, mode), one bar per provider; and the fraction of
    copy bandwidth on CUDA. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r.config, r.mode) for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows))
    by_key = {(r.config, r.mode, r.provider): r for r in rows}
    has_bw = any(not math.isnan(r.copy_fraction) for r in rows)
    fig, axes = plt.subplots(2 if has_bw else 1, 1, figsize=(max(6, 1.6 * len(groups)), 7),
                             squeeze=False)
    width = 0.8 / max(1, len(providers))
    panels = [("median ms (log)", lambda r: r.median_ms)]
    if has_bw:
        panels.append(("fraction of copy bandwidth", lambda r: r.copy_fraction))
    for ax, (label, value) in zip(axes[:, 0], panels, strict=True):
        for k, provider in enumerate(providers):
            xs, ys = [], []
            for g, (config, mode) in enumerate(groups):
                r = by_key.get((config, mode, provider))
                if r is not None:
                    xs.append(g + (k - (len(providers) - 1) / 2) * width)
                    ys.append(value(r))
            ax.bar(xs, ys, width, label=provider)
        ax.set_xticks(range(len(groups)), [f"{c}\n{m}" for c, m in groups], fontsize=8)
        ax.set_ylabel(label)
        if label.endswith("(log)"):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0, 0].set_title(textwrap.fill(title, 100), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------- main

PROG = "kernels.bench"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    all_configs = [*GPU_CONFIGS, *CPU_CONFIGS]
    p = ArgumentParser(  # one-line errors, as every command of the project
        prog=f"python -m {PROG}",
        description="Time the feature-distillation loss (pool all taps + pair distances + "
        "weighted sum) for the eager reference, torch.compile of it, and the fused kernels.",
    )
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="directory for results.csv and results.png (default: bench-out; "
                   "made if missing)")
    p.add_argument("--configs", type=lambda v: choice_list(v, all_configs, "config"),
                   default=None, help="comma-separated; GPU: " + ", ".join(GPU_CONFIGS)
                   + " (default all); CPU: " + ", ".join(CPU_CONFIGS) + " (default all)")
    p.add_argument("--providers", type=lambda v: choice_list(v, PROVIDERS, "provider"),
                   default=None, help=f"comma-separated from {', '.join(PROVIDERS)} (default: "
                   f"{','.join(DEFAULT_GPU_PROVIDERS)} on CUDA, "
                   f"{','.join(DEFAULT_CPU_PROVIDERS)} on CPU)")
    p.add_argument("--modes", type=lambda v: choice_list(v, MODES, "mode"), default=list(MODES),
                   help="comma-separated from fwd, fwd+bwd (default both)")
    p.add_argument("--loss", choices=("ops", "module"), default="ops",
                   help="ops: the ops (feature_terms, weighted_sum) with a fixed attention "
                   "tensor (default); module: the real FeatureDistillation, attention MLPs "
                   "included")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available, else CPU at small shapes")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the taps (default bf16)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (CUDA)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms (CUDA)")
    p.add_argument("--cpu-reps", type=int, default=5, help="timed repetitions per row (CPU)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the fused-vs-reference check (batch 4) run before timing")
    p.add_argument("--model", action="store_true",
                   help="print the launch plan of the GPU configs instead of timing: bytes "
                   "per kernel vs the floor, programs per SM, and the bandwidth-bound time on "
                   "an H100 and an H200 (a projection; needs Triton, not a GPU)")
    p.add_argument("--host", action="store_true",
                   help="time the host side of the fused loss instead, every kernel stubbed "
                   "out, at the GPU configs' tap structures on this CPU, with freed memory "
                   "kept for reuse as on a GPU (also on taps with 1/16 of the channels, "
                   "and with malloc as it is; needs Triton)")
    p.add_argument("--tiles", action="store_true",
                   help="time the pool kernels alone at the GPU configs with each pool tile "
                   "variant (the default, 64x64 for all taps, small taps apart) against the "
                   "copy bandwidth (needs a CUDA GPU)")
    return p.parse_args(argv)


@exit_on_user_error(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise UserError("--device cuda, but CUDA is not available on this machine")
    device = torch.device("cuda" if cuda and args.device != "cpu" else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.model or args.host:
        return plan_main(args, dtype)
    if args.tiles:
        return tiles_main(args, device, dtype)
    catalog = GPU_CONFIGS if device.type == "cuda" else CPU_CONFIGS
    names = args.configs or list(catalog)
    wrong = [n for n in names if n not in catalog]
    if wrong:
        raise UserError(f"config(s) {', '.join(wrong)} are for the "
                        f"{'CPU' if device.type == 'cuda' else 'GPU'}; on {device.type} choose "
                        f"from {', '.join(catalog)}")
    writable_directory(args.out, "--out", create=False)  # before timing, not after
    providers = args.providers or list(
        DEFAULT_GPU_PROVIDERS if device.type == "cuda" else DEFAULT_CPU_PROVIDERS)

    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        versions += ", no triton"
    if device.type == "cuda":
        name = device_name(device)
        copy_gbps = copy_bandwidth_gbps(device, args.warmup, args.rep)
        header = f"{name}, {versions}; copy bandwidth {copy_gbps:.0f} GB/s (1 GiB D2D copy)"
        title = header
    else:
        copy_gbps = 0.0
        header = (f"CPU ({torch.get_num_threads()} threads), {versions}. CUDA is not "
                  "available: timing small CPU shapes with time.perf_counter; the fused "
                  "provider runs the reference fallback here (its kernels need a GPU).")
        title = f"CPU, {versions} (no CUDA: small shapes; fused = reference fallback)"
    print(header, flush=True)
    print(f"loss: {args.loss}; taps {args.dtype} channels_last; providers "
          f"{', '.join(providers)}; modes {', '.join(args.modes)}", flush=True)

    if args.check:
        failed = False
        for name in names:
            ok, line = check_fused(catalog[name], device, dtype)
            print(line, flush=True)
            failed |= not ok
        if failed:
            print(f"{PROG}: error: the fused kernels disagree with the reference; not timing "
                  "them", file=sys.stderr)
            return 1

    rows: list[Row] = []
    for name in names:
        config = catalog[name]
        rows += run_config(config, providers, args.modes, args.loss, device, dtype, copy_gbps,
                           args)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "results.csv")
    print(f"\nwrote {args.out / 'results.csv'}")
    if write_plot(rows, args.out / "results.png", title):
        print(f"wrote {args.out / 'results.png'}")
    else:
        print("matplotlib is not installed: no plot (the CSV has every number)")
    return 0


def gpu_configs(names: Sequence[str] | None, mode: str) -> list[Config]:
    """The named GPU configs (all by default); a UserError for any other name (the CPU
    configs: `mode` works on the GPU configs' shapes)."""
    names = names or list(GPU_CONFIGS)
    wrong = [n for n in names if n not in GPU_CONFIGS]
    if wrong:
        raise UserError(f"{mode} take GPU configs ({', '.join(GPU_CONFIGS)}), not "
                        f"{', '.join(wrong)}")
    return [GPU_CONFIGS[n] for n in names]


def tiles_main(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> int:
    """--tiles: the pool tile variants, on a GPU."""
    if device.type != "cuda" or not common.triton_available():
        raise UserError("--tiles times the Triton pool kernels on a CUDA GPU, and this "
                        "machine has none (--model gives their plan without one)")
    configs = gpu_configs(args.configs, "--tiles")
    copy_gbps = copy_bandwidth_gbps(device, args.warmup, args.rep)
    print(f"pool kernels alone per tile variant, {device_name(device)}, {args.dtype} "
          f"channels_last taps; copy bandwidth {copy_gbps:.0f} GB/s (1 GiB D2D copy); "
          "fwd: both sides' taps, bwd: the student's\n")
    print(tile_report(configs, device, dtype, copy_gbps, args.warmup, args.rep))
    return 0


def plan_main(args: argparse.Namespace, dtype: torch.dtype) -> int:
    """--model / --host: what needs Triton but no GPU."""
    if not common.triton_available():
        raise UserError("--model and --host need Triton (pip install triton)")
    configs = gpu_configs(args.configs, "--model / --host")
    if args.model:
        print(f"PROJECTION (not a measurement): the fused loss's launch plan, {args.dtype} "
              "channels_last taps; time = bytes / the card's peak HBM bandwidth ("
              + ", ".join(f"{card} {bw:.0f} GB/s" for card, (_, bw) in plan.CARDS.items())
              + f"), no launch latency; programs/SM on {plan.CARDS[next(iter(plan.CARDS))][0]} "
              "SMs\n")
        print(model_report(configs, dtype))
    if args.host:
        calls = args.cpu_reps * 40  # ~1 ms each: many calls, so the median is a stable one
        print(f"\nhost side of the fused loss, kernels stubbed out, on this CPU "
              f"({torch.get_num_threads()} threads), median of {calls} calls:")
        print(host_report(configs, dtype, calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())

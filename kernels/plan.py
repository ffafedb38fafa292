"""The fused loss launch by launch, without running a kernel (and without a GPU).

- `loss_launches`: every Triton launch of one feature-loss forward + backward as training
  makes it (teacher taps detached), captured from the real ops and their autograd backward
  with the launches intercepted; on the meta device, so the real batch costs no memory.
  kernels.compile_check compiles these launches for sm_80 / sm_90.
- `pool_work`, `captured`: the pool kernels' share of one loss with a tile variant of
  kernels.pool.TILE_VARIANTS, and the launches any call makes (kernels.bench --tiles,
  kernels.compile_check --tile-variants).
- `launch_bytes`, `programs`: what each launch moves (every tensor argument read or
  written once: the kernels are single-pass) and how many programs its grid has.
- `projection`: the bandwidth-bound time those bytes need on a card, a *projection*.
- `host_ms`: the host side of the fused loss (Python, torch.library dispatch, autograd,
  allocations, the non-Triton torch ops) with every kernel stubbed out: what the GPU would
  wait for if the kernels took no time.
  `host_ms_side_by_side` times several such losses in turn, call by call.

`python -m kernels.bench --model` and `--host` print them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import fused, pairs, pool

Shape = tuple[int, int, int]  # (C, H, W) of a tap
Tap = tuple[int, int]  # (channels, size): a square [B, C, size, size] tap


def _taps(*groups: tuple[int, int, int]) -> tuple[Tap, ...]:
    """(count, channels, size) groups -> the tap list."""
    return tuple((c, s) for count, c, s in groups for _ in range(count))


# The tap structures the benchmarks and the compile check use (one per block).
WRN34_10_CIFAR = _taps((5, 160, 32), (5, 320, 16), (5, 640, 8))
RESNET18_CIFAR = _taps((2, 64, 32), (2, 128, 16), (2, 256, 8), (2, 512, 4))


def resnet50_taps(px: int) -> tuple[Tap, ...]:
    s = px // 4  # 56 at 224 px, 40 at 160 px
    return _taps((3, 256, s), (4, 512, s // 2), (6, 1024, s // 4), (3, 2048, s // 8))


def shapes(taps: Sequence[Tap]) -> list[Shape]:
    """(C, H, W) of square taps."""
    return [(c, s, s) for c, s in taps]

# Cards of the projection: (SMs, HBM bandwidth in GB/s, from the vendors' data sheets).
CARDS = {"H100 SXM": (132, 3350.0), "H200": (132, 4800.0)}


@dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple = ()


@contextmanager
def intercepted(into: list[Launch]) -> Iterator[None]:
    """Record every Triton launch instead of running it."""
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, args, kwargs, tuple(grid) if not callable(grid) else ()))

    real = JITFunction.run
    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = real


def empty_taps(shapes: Sequence[Shape], batch: int, dtype: torch.dtype, layout: str,
               device: str = "meta") -> list[Tensor]:
    """Uninitialized taps [batch, C, H, W] of these shapes, in "nchw" or "channels_last"."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [torch.empty(batch, c, h, w, dtype=dtype, device=device).contiguous(
        memory_format=fmt) for c, h, w in shapes]


def captured(fn: Callable[[], object]) -> list[Launch]:
    """The Triton launches fn() makes, recorded instead of run."""
    launches: list[Launch] = []
    with intercepted(launches):
        fn()
    return launches


def pool_work(teacher: Sequence[Tensor], student: Sequence[Tensor], options: dict
              ) -> tuple[Callable[[], None], Callable[[], None]]:
    """The pool kernels' share of one loss with pool_plan(**options) (a pool.TILE_VARIANTS
    entry): (forward of both sides' taps, backward of the student's, with all-ones
    gradients), the host functions called directly."""
    t_plan, s_plan = pool.pool_plan(teacher, **options), pool.pool_plan(student, **options)
    device, batch = student[0].device, student[0].shape[0]
    g_maps = torch.ones(batch, s_plan.maps_len, device=device)
    g_gaps = torch.ones(batch, s_plan.gaps_len, device=device)

    def forward() -> None:
        pool.pool_fwd(teacher, plan=t_plan)
        pool.pool_fwd(student, plan=s_plan)

    def backward() -> None:
        pool.pool_bwd(student, g_maps, g_gaps, plan=s_plan)

    return forward, backward


def loss_launches(teacher: Sequence[Shape], student: Sequence[Shape], batch: int,
                  dtype: torch.dtype, layout: str, device: str = "meta") -> list[Launch]:
    """The launches of one forward and backward of the feature loss, as the loss makes them:
    the real op (fused.feature_terms: pool_taps per side, the pair distances) and its backward,
    routed to the kernels and with every launch recorded instead of run. That is the pool
    forward of all teacher and of all student taps (each with its GAP reduction when a tap
    spans several spatial blocks), the pair distances, their backward, and the pool backward
    of the student taps (the teacher's are detached)."""
    def taps(shapes: Sequence[Shape]) -> list[Tensor]:
        return empty_taps(shapes, batch, dtype, layout, device)

    launches: list[Launch] = []
    with intercepted(launches), routed_to_kernels():
        _, s_gaps, d = fused.feature_terms(taps(teacher),
                                           [z.requires_grad_() for z in taps(student)])
        torch.autograd.backward([d, s_gaps], [torch.empty_like(d), torch.empty_like(s_gaps)])
    return launches


def tensor_args(launch: Launch) -> Iterator[Tensor]:
    """The launch's tensor arguments, the tuples of taps unpacked."""
    for arg in launch.args:
        yield from (x for x in (arg if isinstance(arg, tuple) else (arg,))
                    if isinstance(x, Tensor))


def launch_bytes(launch: Launch) -> int:
    """Bytes one launch moves: each distinct tensor argument once (a placeholder passed for
    an absent gradient is the same tensor as z, so it is not counted twice). Where a side
    needs several pool groups (NCHW at ImageNet's shapes, small taps apart) each group's
    launch gets the whole packed output rows and is counted with all of them, an overcount
    of 1-3 % (small taps apart, bf16: 1.4 % at 224 px, 2.6 % at CIFAR); the channels_last
    plans `--model` prints have one group per side."""
    seen, total = set(), 0
    for arg in tensor_args(launch):
        if id(arg) not in seen:
            seen.add(id(arg))
            total += arg.numel() * arg.element_size()
    return total


def programs(launch: Launch) -> int:
    count = 1
    for size in launch.grid:
        count *= int(size)
    return count


@dataclass
class KernelLine:
    """One kernel's share of the plan."""

    kernel: str
    launches: int
    bytes: int
    min_programs: int
    max_programs: int
    tile_slots: int = 0  # the pool kernels: tile elements the programs load, masked or not
    tile_data: int = 0  # ... and those that hold tap data

    @property
    def lane_use(self) -> float | None:
        """tile_data / tile_slots: how much of each loaded tile is data (the rest are masked
        lanes, e.g. 49 of the 128 positions of a 7x7 tap's tile). None for other kernels."""
        return self.tile_data / self.tile_slots if self.tile_slots else None


def tile_use(launch: Launch) -> tuple[int, int]:
    """(tile slots, data elements) of a pool launch over all its programs: each work item
    walks ceil(C / BLOCK_C) tiles of BLOCK_HW x BLOCK_C; (0, 0) for the other kernels."""
    if "N_TAPS" not in launch.kwargs:
        return 0, 0
    block_hw, block_c = launch.kwargs["BLOCK_HW"], launch.kwargs["BLOCK_C"]
    slots = data = 0
    for z in launch.args[0]:  # the tuple of taps
        batch, c, h, w = z.shape
        slots += batch * -(-h * w // block_hw) * block_hw * -(-c // block_c) * block_c
        data += batch * c * h * w
    return slots, data


def summarize(launches: Sequence[Launch]) -> list[KernelLine]:
    lines: dict[str, KernelLine] = {}
    for launch in launches:
        name = launch.kernel.__name__
        line = lines.setdefault(name, KernelLine(name, 0, 0, 1 << 62, 0))
        line.launches += 1
        line.bytes += launch_bytes(launch)
        line.min_programs = min(line.min_programs, programs(launch))
        line.max_programs = max(line.max_programs, programs(launch))
        slots, data = tile_use(launch)
        line.tile_slots, line.tile_data = line.tile_slots + slots, line.tile_data + data
    return list(lines.values())


def projection_ms(launches: Sequence[Launch], gb_per_s: float) -> float:
    """Time the launches' bytes need at `gb_per_s` (the bandwidth bound, nothing else: no
    launch latency, no partial waves). A projection, not a measurement."""
    return sum(launch_bytes(launch) for launch in launches) / (gb_per_s * 1e9) * 1e3


@contextmanager
def routed_to_kernels() -> Iterator[None]:
    """The ops take their Triton path on any tensors (CPU, meta), as eager calls on CUDA do."""
    routes = [(module, name) for module in (pool, pairs, fused)
              for name in ("use_triton", "eager_triton", "triton_device")
              if hasattr(module, name)]
    saved = [getattr(module, name) for module, name in routes]
    for module, name in routes:
        setattr(module, name, lambda tensors_or_device: True)
    try:
        yield
    finally:
        for (module, name), real in zip(routes, saved, strict=True):
            setattr(module, name, real)


@contextmanager
def stubbed_kernels(counter: list[int]) -> Iterator[None]:
    """Every Triton launch becomes a no-op (counted), and the ops take their Triton path on
    CPU tensors: what is left is the host's own work."""
    from triton.runtime.jit import JITFunction

    def nothing(self, *args, grid, warmup, **kwargs):
        counter[0] += 1

    real = JITFunction.run
    JITFunction.run = nothing
    try:
        with routed_to_kernels():
            yield
    finally:
        JITFunction.run = real


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Within: this process's CPU allocations behave like CUDA's caching allocator. glibc
    serves each multi-MB buffer (a batch-2 tap's dz) with mmap and returns it with munmap,
    ~5 us a buffer that a GPU's allocator, which keeps freed blocks, does not pay; raising
    glibc's mmap and trim thresholds keeps freed blocks in the heap for the next allocation.
    Yields False (and changes nothing) where there is no glibc. On exit both thresholds go
    back to glibc's default values (its dynamic raising of the mmap threshold, which an
    explicit setting turns off, stays off for the process: a benchmark's, not a trainer's)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        yield False
        return
    trim, mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD (glibc's malloc.h)
    kept = bool(mallopt(mmap, 1 << 30)) and bool(mallopt(trim, 1 << 30))
    try:
        yield kept
    finally:
        mallopt(mmap, 128 * 1024)  # glibc's default values
        mallopt(trim, 128 * 1024)


def host_ms(loss, make_inputs, reps: int = 20) -> tuple[float, float, int]:
    """(median host ms of loss(inputs), of loss(inputs).backward(), launches per forward +
    backward) with the kernels stubbed; `make_inputs()` gives fresh CPU inputs. `loss` may
    also return (outputs, gradients) for torch.autograd.backward instead of a scalar."""
    return host_ms_side_by_side([(loss, make_inputs)], reps)[0]


def host_ms_side_by_side(runs: Sequence[tuple[Callable, Callable]], reps: int = 20
                         ) -> list[tuple[float, float, int]]:
    """host_ms of each (loss, make_inputs) pair, their calls taken in turn (one call of
    each per round): a shared machine's drift in speed then moves every pair alike, so
    their ratios hold within one run where timings taken one after another would not."""
    counter = [0]
    with stubbed_kernels(counter):
        inputs = [make_inputs() for _, make_inputs in runs]
        forward: list[list[float]] = [[] for _ in runs]
        both: list[list[float]] = [[] for _ in runs]
        launches = [0] * len(runs)
        for rep in range(reps + 1):
            for i, ((loss, _), x) in enumerate(zip(runs, inputs, strict=True)):
                for s in x.student:
                    s.grad = None
                counter[0] = 0
                start = time.perf_counter()
                value = loss(x)
                middle = time.perf_counter()
                if isinstance(value, tuple):
                    torch.autograd.backward(*value)
                else:
                    value.backward()
                end = time.perf_counter()
                launches[i] = counter[0]
                if rep:  # the first call pays one-time costs (plans, caches)
                    forward[i].append((middle - start) * 1e3)
                    both[i].append((end - start) * 1e3)
        return [(statistics.median(f), statistics.median(b), n)
                for f, b, n in zip(forward, both, launches, strict=True)]


class _NoOp(torch.autograd.Function):
    """An op over the taps that computes nothing: forward a scalar, backward an unwritten
    gradient for each tap that asks for one (allocated, as any op's backward must)."""

    @staticmethod
    def forward(ctx, *taps: Tensor) -> Tensor:
        ctx.save_for_backward(*taps)
        return taps[0].new_zeros(())

    @staticmethod
    def backward(ctx, _grad: Tensor) -> tuple[Tensor | None, ...]:
        return tuple(torch.empty_like(z) if need else None
                     for z, need in zip(ctx.saved_tensors, ctx.needs_input_grad, strict=True))


def autograd_floor_ms(make_inputs, reps: int = 200) -> float:
    """host_ms (forward + backward) of a no-op autograd.Function over every tap of
    `make_inputs()` (the student's asking for gradients): the autograd engine's own cost for
    an op with these inputs (its fixed cost plus a few us per tap on this CPU), the floor
    under host_ms's numbers that no implementation of the ops can remove."""
    return host_ms(no_op_loss, make_inputs, reps)[1]


def no_op_loss(x) -> Tensor:
    """The no-op op over every tap of kernels.bench's inputs (see autograd_floor_ms)."""
    return _NoOp.apply(*x.teacher, *x.student)

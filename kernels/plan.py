"""The fused loss launch by launch, without running a kernel (and without a GPU).

- `loss_launches`: every Triton launch of one feature-loss forward + backward as training
  makes it (teacher taps detached), captured from the real host functions of pool.py and
  pairs.py with the launches intercepted; on the meta device, so the real batch costs no
  memory. kernels.compile_check compiles these launches for sm_80 / sm_90.
- `launch_bytes`, `programs`: what each launch moves (every tensor argument read or
  written once: the kernels are single-pass) and how many programs its grid has.
- `projection`: the bandwidth-bound time those bytes need on a card, a *projection*.
- `host_ms`: the host side of the fused loss (Python, torch.library dispatch, autograd,
  allocations, the non-Triton torch ops) with every kernel stubbed out: what the GPU would
  wait for if the kernels took no time.

`python -m kernels.bench --model` and `--host` print them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import common, pairs, pool

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
    unit_stride_aligned: bool | None = None  # pool kernels: the streamed axis 16-B aligned


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


def loss_launches(teacher: Sequence[Shape], student: Sequence[Shape], batch: int,
                  dtype: torch.dtype, layout: str, device: str = "meta") -> list[Launch]:
    """The launches of one forward and backward of the feature loss: a pool forward per tap,
    the pair distances, their backward, a pool backward per student tap."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def tap(c: int, h: int, w: int) -> Tensor:
        return torch.empty(batch, c, h, w, dtype=dtype, device=device).contiguous(
            memory_format=fmt)

    def aligned(c: int, h: int, w: int) -> bool:
        # The JIT marks an integer argument divisible by 16 only when its value is: so the
        # unit-stride axis (C or H*W elements) is known aligned exactly then.
        return (c if layout == "channels_last" else h * w) % 16 == 0

    launches: list[Launch] = []
    with intercepted(launches):
        t_maps = []
        for shape in teacher:
            t_maps.append(pool.pool_fwd(tap(*shape))[0])
            launches[-1].unit_stride_aligned = aligned(*shape)
        s_taps, s_maps = [tap(*shape) for shape in student], []
        for z, shape in zip(s_taps, student, strict=True):
            s_maps.append(pool.pool_fwd(z)[0])
            launches[-1].unit_stride_aligned = aligned(*shape)
        _, stats = pairs.pairs_fwd(t_maps, s_maps)
        grad_d = torch.empty(batch, len(t_maps), len(s_maps), device=device)
        _, gs = pairs.pairs_bwd(grad_d, t_maps, s_maps, stats, need_t=False, need_s=True)
        for z, g_map, shape in zip(s_taps, common.unpack(gs, s_maps), student, strict=True):
            pool.pool_bwd(z, g_map, torch.empty(batch, z.shape[1], device=device))
            launches[-1].unit_stride_aligned = aligned(*shape)
    return launches


def launch_bytes(launch: Launch) -> int:
    """Bytes one launch moves: each distinct tensor argument once (a placeholder passed for
    an absent gradient is the same tensor as z, so it is not counted twice)."""
    seen, total = set(), 0
    for arg in launch.args:
        if isinstance(arg, Tensor) and id(arg) not in seen:
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


def summarize(launches: Sequence[Launch]) -> list[KernelLine]:
    lines: dict[str, KernelLine] = {}
    for launch in launches:
        name = launch.kernel.__name__
        line = lines.setdefault(name, KernelLine(name, 0, 0, 1 << 62, 0))
        line.launches += 1
        line.bytes += launch_bytes(launch)
        line.min_programs = min(line.min_programs, programs(launch))
        line.max_programs = max(line.max_programs, programs(launch))
    return list(lines.values())


def projection_ms(launches: Sequence[Launch], gb_per_s: float) -> float:
    """Time the launches' bytes need at `gb_per_s` (the bandwidth bound, nothing else: no
    launch latency, no partial waves). A projection, not a measurement."""
    return sum(launch_bytes(launch) for launch in launches) / (gb_per_s * 1e9) * 1e3


@contextmanager
def stubbed_kernels(counter: list[int]) -> Iterator[None]:
    """Every Triton launch becomes a no-op (counted), and the ops take their Triton path on
    CPU tensors: what is left is the host's own work."""
    from triton.runtime.jit import JITFunction

    def nothing(self, *args, grid, warmup, **kwargs):
        counter[0] += 1

    saved = JITFunction.run, pool.use_triton, pairs.use_triton
    JITFunction.run = nothing
    pool.use_triton = pairs.use_triton = lambda tensors: True
    try:
        yield
    finally:
        JITFunction.run, pool.use_triton, pairs.use_triton = saved


def host_ms(loss, make_inputs, reps: int = 20) -> tuple[float, float, int]:
    """(median host ms of loss(inputs), of loss(inputs).backward(), launches per forward +
    backward) with the kernels stubbed; `make_inputs()` gives fresh CPU inputs."""
    counter = [0]
    with stubbed_kernels(counter):
        inputs = make_inputs()
        forward, both = [], []
        for rep in range(reps + 1):
            for s in inputs.student:
                s.grad = None
            counter[0] = 0
            start = time.perf_counter()
            value = loss(inputs)
            middle = time.perf_counter()
            value.backward()
            end = time.perf_counter()
            if rep:  # the first call pays one-time costs (plans, caches)
                forward.append((middle - start) * 1e3)
                both.append((end - start) * 1e3)
        return statistics.median(forward), statistics.median(both), counter[0]

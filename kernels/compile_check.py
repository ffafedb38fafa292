"""Compile every Triton kernel for real GPUs on a machine without one, and check the result:
`python -m kernels.compile_check [--archs 80,90] [--configs cifar,imagenet160,imagenet224]
[--tile-variants]`.

The launches are the ones training makes. For each config (the CIFAR teacher/student taps,
ResNet-50 -> ResNet-50 at 160 and 224 px), dtype (bf16, fp16, fp32) and memory format (NCHW,
channels_last), the host functions of kernels/pool.py and kernels/pairs.py run on CPU tensors
of the real shapes (batch 2: the batch size changes no specialization) with every kernel launch
intercepted. Each launch is then specialized exactly as Triton's JIT would specialize it on a GPU
(its own binder: argument types, 16-byte divisibility of pointers and integers, constexprs), and
compiled ahead of time for sm_80 and sm_90 with Triton's bundled ptxas. `cuobjdump -res-usage`
and `nvdisasm` from the same folder read registers, stack, local and shared memory, and the
widths of the global loads and stores.

A compiled kernel fails the check on: a compile error; spills or local memory (STACK or LOCAL
above 0); more than 128 registers; or, for the pool kernels (the ones that stream the feature
maps), no vectorized global access (128- or 64-bit) in a launch whose taps all have an
aligned unit-stride axis (its length, C for channels_last or H*W for NCHW, and the batch
stride divisible by 16: the ALIGNED constexpr, which tells the compiler what the JIT would
know from the sizes as integer arguments).
Prints a table; exits 1 when anything fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastibd.cli import ArgumentParser, choice_list
from kernels import common
from kernels.plan import (
    RESNET18_CIFAR,
    WRN34_10_CIFAR,
    Launch,
    Shape,
    captured,
    empty_taps,
    loss_launches,
    pool_work,
    resnet50_taps,
    shapes,
)
from kernels.pool import TILE_VARIANTS

MAX_REGISTERS = 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("nchw", "channels_last")
ARCHS = ("80", "90")
BATCH = 2


CONFIGS: dict[str, tuple[list[Shape], list[Shape]]] = {  # (teacher taps, student taps)
    "cifar": (shapes(WRN34_10_CIFAR), shapes(RESNET18_CIFAR)),  # WRN-34-10 -> ResNet-18
    **{f"imagenet{px}": (shapes(resnet50_taps(px)), shapes(resnet50_taps(px)))
       for px in (160, 224)},  # ResNet-50 -> ResNet-50
}


@dataclass
class Result:
    kernel: str
    where: str  # config / dtype / layout of the first launch that needed this compile
    arch: str
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    loads: dict[str, int] = field(default_factory=dict)  # SASS width -> count
    stores: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def training_launches(config: str, dtype: torch.dtype, layout: str) -> list[Launch]:
    """The kernel launches of one forward and backward of the feature loss, as training makes
    them (kernels.plan), on CPU tensors of the config's shapes at batch 2."""
    teacher, student = CONFIGS[config]
    return loss_launches(teacher, student, BATCH, dtype, layout, device="cpu")


def variant_launches(config: str, dtype: torch.dtype, layout: str
                     ) -> list[tuple[str, Launch]]:
    """(variant, launch) for the pool launches of one loss with each alternative tile of
    kernels.pool.TILE_VARIANTS (the default's are training_launches'), same shapes."""
    teacher, student = CONFIGS[config]
    found = []
    for name, options in TILE_VARIANTS.items():
        if options:
            work = pool_work(empty_taps(teacher, BATCH, dtype, layout, "cpu"),
                             empty_taps(student, BATCH, dtype, layout, "cpu"), options)
            found += [(name, launch) for fn in work for launch in captured(fn)]
    return found


def compile_for(launch: Launch, arch: str):
    """(the compile key, compiled kernel) of `launch` for sm_`arch`, specialized as the JIT
    specializes it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, target = launch.kernel, GPUTarget("cuda", int(arch), 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound,
                                                          specialization, options)
    key = (fn.__name__, arch, str(signature), str(constexprs), str(attrs), str(options))
    return key, lambda: compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)


def read_cubin(cubin: bytes, result: Result) -> None:
    """Registers, stack, local and shared memory, and the SASS global load/store widths."""
    tools = Path(common.triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", file.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tools / "nvdisasm"), file.name], capture_output=True,
                              text=True, check=True).stdout
    for name, attr in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "shared"),
                       ("LOCAL", "local")):
        match = re.search(rf"\b{name}:(\d+)", usage)
        setattr(result, attr, int(match.group(1)) if match else 0)
    for op, into in (("LDG", result.loads), ("STG", result.stores)):
        for instruction in re.findall(rf"\b{op}\.E(\.[A-Z0-9.]+)?", sass):
            width = next((w for w in (".128", ".64") if w in instruction), ".<=32")
            into[width] = into.get(width, 0) + 1


def check(results: dict[tuple, Result], launch: Launch, arch: str, where: str) -> None:
    key, build = compile_for(launch, arch)
    if key in results:
        return
    result = results[key] = Result(launch.kernel.__name__, where, arch)
    try:
        compiled = build()
    except Exception as err:  # noqa: BLE001 - any compile failure is the finding
        result.problems.append(f"compile error: {str(err).strip().splitlines()[-1][:120]}")
        return
    read_cubin(compiled.asm["cubin"], result)
    if result.stack or result.local:
        result.problems.append(f"spills / local memory (stack {result.stack}, local "
                               f"{result.local})")
    if result.registers > MAX_REGISTERS:
        result.problems.append(f"{result.registers} registers > {MAX_REGISTERS}")
    if launch.kwargs.get("ALIGNED"):  # the pool kernels, where the JIT would know alignment
        vector = sum(result.loads.get(w, 0) + result.stores.get(w, 0) for w in (".128", ".64"))
        if not vector:
            result.problems.append("no vectorized global access on an aligned unit-stride axis")


def run_checks(configs: list[str], dtypes: list[str], layouts: list[str],
               archs: list[str], tile_variants: bool = False) -> list[Result]:
    results: dict[tuple, Result] = {}
    for config in configs:
        for dtype in dtypes:
            for layout in layouts:
                where = f"{config}/{dtype}/{layout}"
                launches = [(where, x) for x in training_launches(config, DTYPES[dtype], layout)]
                if tile_variants:
                    launches += [(f"{where}/{name}", x)
                                 for name, x in variant_launches(config, DTYPES[dtype], layout)]
                for label, launch in launches:
                    for arch in archs:
                        check(results, launch, arch, label)
    return list(results.values())


def format_table(results: list[Result]) -> str:
    def widths(counts: dict[str, int]) -> str:
        order = {".128": 0, ".64": 1, ".<=32": 2}
        return " ".join(f"{w.strip('.')}:{counts[w]}" for w in sorted(counts, key=order.get)
                        ) or "-"

    wide = max([len("first needed by"), *(len(r.where) for r in results)])
    header = (f"{'kernel':<26} {'first needed by':<{wide}} {'sm':>3} {'regs':>4} {'spill':>5} "
              f"{'smem':>6}  {'loads (bits:count)':<24} {'stores':<16} verdict")
    lines = [header, "-" * len(header)]
    for r in sorted(results, key=lambda r: (r.kernel, r.arch, r.where)):
        verdict = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
        lines.append(f"{r.kernel:<26} {r.where:<{wide}} {r.arch:>3} {r.registers:>4} "
                     f"{r.stack + r.local:>5} {r.shared:>6}  {widths(r.loads):<24} "
                     f"{widths(r.stores):<16} {verdict}")
    failed = sum(bool(r.problems) for r in results)
    lines.append(f"{len(results)} distinct compiles, {failed} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m kernels.compile_check",
                            description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=lambda v: choice_list(v, list(CONFIGS), "config"),
                        default=list(CONFIGS),
                        help="tap structures whose launches are compiled, comma-separated: "
                        "cifar (WRN-34-10 -> ResNet-18), imagenet160, imagenet224 (ResNet-50 "
                        "-> ResNet-50); default all")
    parser.add_argument("--dtypes", type=lambda v: choice_list(v, list(DTYPES), "dtype"),
                        default=list(DTYPES),
                        help="dtypes of the taps, comma-separated: bf16, fp16, fp32 (default "
                        "all)")
    parser.add_argument("--layouts", type=lambda v: choice_list(v, LAYOUTS, "layout"),
                        default=list(LAYOUTS),
                        help="memory formats of the taps, comma-separated: nchw, channels_last "
                        "(default both)")
    parser.add_argument("--archs", type=lambda v: choice_list(v, ARCHS, "arch"),
                        default=list(ARCHS),
                        help="CUDA compute capabilities compiled for, comma-separated: 80, 90 "
                        "(default both)")
    parser.add_argument("--tile-variants", action="store_true",
                        help="also the pool launches of the alternative tiles that "
                        "`kernels.bench --tiles` measures (kernels.pool.TILE_VARIANTS)")
    args = parser.parse_args(argv)
    if not common.triton_available():
        print("kernels.compile_check: error: Triton is not installed here", file=sys.stderr)
        return 2
    results = run_checks(args.configs, args.dtypes, args.layouts, args.archs,
                         args.tile_variants)
    print(format_table(results))
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU instructions per call of the fused loss's host side, counted by valgrind: what
`python -m kernels.bench --host` times, as a number that a busy or shared machine does not move.

    python -m kernels.host_instructions [--configs imagenet224-b256 ...] [--calls 500]

kernels.bench --host times the host work (Python, dispatch, autograd, allocations; every
kernel stubbed out) in wall-clock milliseconds, which a virtual machine's stolen time moves
by 30 % and more from run to run. Instructions do not: callgrind counts every one the
process runs. Each number is the difference between a run making `--calls` more calls and
a run making 10 of each, divided by `--calls`; what both runs share (the imports, the first
calls' plan building) cancels. One OpenMP thread, a fixed hash seed: nothing else differs.

Columns: the loss (kernels.bench.ops_loss: the op, the weighted sum, a probe on the GAPs),
the same loss on taps with ~1/16 of the channels (kernels.bench.HOST_CHANNEL_DIVISOR: the
instructions that the torch ops around the op spend computing on this CPU, device work on a
GPU, shrink; the op's host work does not), the op alone (ops_only), and the no-op floor
(an autograd.Function over the same taps that computes nothing: the autograd engine's
share). Compare two commits by running this in a checkout of each. Instructions are a
proxy for time (they ignore cache misses and the instructions' own costs), for comparing
implementations of the same work, not a time.

Needs valgrind (apt-get install valgrind) and Triton; ~18 minutes per config on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastibd.errors import UserError, exit_on_user_error
from kernels.bench import GPU_CONFIGS, HOST_CHANNEL_DIVISOR, aligned

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("loss", "narrow", "op", "floor")
BASE_CALLS = 10
PROG = "kernels.host_instructions"


def run_calls(config_name: str, calls: dict[str, int]) -> None:
    """The child: `calls[part]` host-side forward + backward calls of each part, stubbed."""
    import torch

    from kernels import bench, fused, plan

    config = bench.GPU_CONFIGS[config_name]
    inputs = bench.host_inputs(config, torch.bfloat16)
    narrow = bench.host_inputs(config, torch.bfloat16, bench.HOST_CHANNEL_DIVISOR)
    runs = {"loss": (bench.ops_loss(fused), inputs), "narrow": (bench.ops_loss(fused), narrow),
            "op": (bench.ops_only(fused), inputs)}
    with plan.freed_memory_kept():
        for part in PARTS:
            if part == "floor":
                plan.autograd_floor_ms(inputs, calls[part] - 1)
            else:  # host_ms makes reps + 1 calls
                plan.host_ms(*runs[part], calls[part] - 1)


def count(config_name: str, calls: dict[str, int]) -> int:
    """Instructions of one child process under callgrind."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": path}
    spec = ",".join(f"{part}={n}" for part, n in calls.items())
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-m", "kernels.host_instructions", "--child", config_name, spec],
        env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"the callgrind run of {config_name} ({spec}) failed:\n{tail}")
    return int(found.group(1))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from fastibd.cli import ArgumentParser

    paragraphs = __doc__.split("\n\n")
    p = ArgumentParser(prog=f"python -m {PROG}", description=paragraphs[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(paragraphs[2:]))
    p.add_argument("--configs", nargs="+", choices=list(GPU_CONFIGS),
                   default=["imagenet224-b256", "cifar-b128"],
                   help="tap structures to count at (kernels.bench's GPU configs)")
    p.add_argument("--calls", type=int, default=500,
                   help=f"calls counted per part beyond the {BASE_CALLS}-call base run "
                   "(default: %(default)s; more: a steadier number, a longer run)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("--calls must be at least 1")
    return args


@exit_on_user_error(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        name, spec = args.child
        run_calls(name, {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))})
        return 0
    if shutil.which("valgrind") is None:
        raise UserError("valgrind is not installed (apt-get install valgrind); "
                        "python -m kernels.bench --host times the same calls")
    from kernels import common

    if not common.triton_available():
        raise UserError("the host side runs the ops' Triton path: it needs Triton "
                        "(pip install triton)")
    base = dict.fromkeys(PARTS, BASE_CALLS)
    jobs = [(name, part) for name in args.configs for part in (None, *PARTS)]
    print(f"counting {len(jobs)} runs under callgrind (~18 minutes per config on 2 cores)...",
          file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(
            lambda job: count(job[0], base if job[1] is None else
                              {**base, job[1]: BASE_CALLS + args.calls}), jobs), strict=True))
    print(f"host side of the fused loss, kernels stubbed, batch 2, bf16: instructions per "
          f"forward + backward call (callgrind; {args.calls} calls beyond a {BASE_CALLS}-call "
          "base run)")
    rows = [("config", "loss", f"loss, C / {HOST_CHANNEL_DIVISOR}", "op alone", "no-op floor")]
    for name in args.configs:
        per_call = [(counts[(name, part)] - counts[(name, None)]) / args.calls for part in PARTS]
        rows.append((name, *(f"{n / 1e6:.3f} M" for n in per_call)))
    print(aligned(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

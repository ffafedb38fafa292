"""Kill trials: SIGKILL a training run at random points, resume it, and check nothing is lost:
`python -m fastibd.bench.kills [--trials 20]`.

Each trial trains a short run on the bundled digits (the `smoke_teacher` recipe, 3 epochs of
6 steps) in its own process and kills it, again and again, until a resumed run finishes:
  - at a random moment (any point of data loading, a step, an evaluation, a write), or
  - from inside a checkpoint write: between the temporary file being written and its
    rename (the moment that decides whether a half-written file could ever be seen).
Then it compares the finished run's last.pt with an uninterrupted reference run, bit for bit,
and counts what was left behind (temporary files of interrupted writes).

Printed, one row per trial and a total: kills (and how many of them inside a write), resumes,
identical (weights and optimizer state bitwise equal to the reference), leftovers (temporary
files in the finished run directory).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastibd.cli import ArgumentParser, bounded
from fastibd.errors import exit_on_user_error
from fastibd.run_dir import LAST, TEMPORARY_GLOB

REPO = Path(__file__).resolve().parents[2]
RUN = ["--cfg", "smoke_teacher", "--training.epochs=3", "--training.max_steps=6",
       "--data.holdout=64", "--attack.steps=2", "--attack.eval_steps=2",
       "--logging.progress=false"]
# The trainer in a process of its own that SIGKILLs itself inside a checkpoint write, after
# the temporary file is complete and before the rename, with probability P (argv[1]).
SELF_KILLING = """
import os, random, signal, sys
p = float(sys.argv[1])
real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith(".pt") and random.random() < p:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
from fastibd.train import main
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class Trial:
    kills: int = 0
    in_write: int = 0  # of the kills, those inside a checkpoint write (before its rename)
    resumes: int = 0
    identical: bool = False
    leftovers: int = 0


def train(args: list[str], out: Path, self_kill: float = 0.0,
          kill_after: float | None = None) -> int:
    """Run the trainer once on `out`; SIGKILL it after `kill_after` seconds if it is still
    running. Its exit code (-9 when killed)."""
    command = [sys.executable, "-c", SELF_KILLING, str(self_kill), *args,
               f"--training.out_dir={out}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    code = process.wait()
    if code not in (0, -signal.SIGKILL):
        raise RuntimeError(f"the run failed ({code}): {process.stderr.read()[-2000:]}")
    return code


def state(path: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {f"model.{k}": v for k, v in saved["model"].items()}
    for i, value in enumerate(saved["optimizer"]["state"].values()):
        tensors |= {f"optimizer.{i}.{k}": v for k, v in value.items()}
    return tensors


def run_trial(args: list[str], out: Path, reference: dict[str, torch.Tensor],
              rng: random.Random, max_seconds: float, max_attempts: int) -> Trial:
    trial = Trial()
    for attempt in range(max_attempts):
        if (out / LAST).exists():
            trial.resumes += 1
        last_try = attempt == max_attempts - 1
        in_write = not last_try and rng.random() < 0.5
        if in_write or last_try:  # killed inside a write (or, the last time, left to finish)
            code = train(args, out, self_kill=0.3 if in_write else 0.0)
        else:  # killed at a random moment
            code = train(args, out, kill_after=rng.uniform(1.0, max_seconds))
        if code == 0:
            break
        trial.kills += 1
        trial.in_write += in_write
    trial.identical = all(torch.equal(reference[k], v) for k, v in state(out / LAST).items())
    trial.leftovers = len(list(out.glob(TEMPORARY_GLOB)))
    return trial


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m fastibd.bench.kills",
                            description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=bounded(int, 1), default=20)
    parser.add_argument("--seed", type=bounded(int, 0), default=0,
                        help="seed of the kill times and choices (the runs use their own)")
    parser.add_argument("--max-seconds", type=bounded(float, 1.0), default=20.0,
                        help="a random kill comes at most this long after the start")
    parser.add_argument("--max-attempts", type=bounded(int, 2), default=6,
                        help="kills per trial at most; the last attempt runs to the end")
    return parser


@exit_on_user_error("fastibd.bench.kills")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fastibd-kills-"))
    try:
        data = work / "digits"
        subprocess.run([sys.executable, "data_prep/write_ffcv.py", "--dataset", "digits",
                        "--out-dir", str(data)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = [*RUN, f"--data.train_path={data / 'train.beton'}",
               f"--data.val_path={data / 'val.beton'}"]
        started = time.perf_counter()
        assert train(run, work / "reference") == 0
        reference = state(work / "reference" / LAST)
        print(f"reference run: {time.perf_counter() - started:.0f} s", flush=True)
        print(f"{'trial':>5} {'kills':>5} {'in write':>8} {'resumes':>7} {'identical':>9} "
              f"{'leftovers':>9}")
        trials = []
        for index in range(args.trials):
            trial = run_trial(run, work / f"trial{index}", reference, rng, args.max_seconds,
                              args.max_attempts)
            trials.append(trial)
            print(f"{index:>5} {trial.kills:>5} {trial.in_write:>8} {trial.resumes:>7} "
                  f"{str(trial.identical):>9} {trial.leftovers:>9}", flush=True)
        print(f"{'all':>5} {sum(t.kills for t in trials):>5} "
              f"{sum(t.in_write for t in trials):>8} {sum(t.resumes for t in trials):>7} "
              f"{sum(t.identical for t in trials):>6}/{len(trials):<2} "
              f"{sum(t.leftovers for t in trials):>9}")
        return 0 if all(t.identical and not t.leftovers for t in trials) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Sweeps: the cross product of setting overrides, run as ordinary training runs, collected
into one table and one figure (the paper's Figure 2: accuracy against alpha and beta).

    python -m fastibd.sweep --cfg cifar10_rn18 --grid loss.alpha=0.7,0.8,0.9 \\
        --grid loss.beta=0.4,0.8,1.2 [--out runs/sweep] [--dry-run] [--section.key=value ...]

Each combination is a run directory of its own under --out (named by its values), trained by
`python -m fastibd.train` in this process, one after another (a run uses every GPU the
trainer sees: `--training.nproc` as usual). A finished run (its metrics.jsonl has the final
record) is skipped, an unfinished one resumes, so rerunning the same command continues the
sweep. Before the first run starts, every combination's settings are checked, and so are
the files each run still to train would refuse at its start (its data files, its teacher
checkpoint when its loss mode distils one): all refusals in one error. At the end
(and with --collect-only) results.csv and sweep.png are written to --out from the runs'
final records (validation clean and PGD accuracy of each run's chosen checkpoint).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastibd.cli import ArgumentParser, parse_number, writable_directory
from fastibd.data.options import dataset_file
from fastibd.errors import UserError, exit_on_user_error
from fastibd.method.modes import MODES
from fastibd.models.teachers import teacher_file
from fastibd.run_dir import LAST, RunDirectory, final_record, read_metrics
from fastibd.train.settings import Settings, load_settings
from fastibd.train.stopping import EXIT_CODES

# A run stopped by Ctrl-C or SIGTERM (a cluster's preemption): the sweep stops too.
STOPPED_CODES = frozenset(EXIT_CODES.values())

PROG = "fastibd.sweep"
KEY = re.compile(r"^[a-z_]+\.[a-z_0-9]+$")


@dataclass(frozen=True)
class Run:
    """One combination: its overrides {key: value} and its run directory."""

    values: dict[str, str]  # every setting it overrides
    directory: Path
    swept: dict[str, str]  # the grid's keys ('a.b' or 'a.b+c.d') and this run's values

    def argv(self, base: Sequence[str]) -> list[str]:
        return [*base, *(f"--{k}={v}" for k, v in self.values.items()),
                f"--training.out_dir={self.directory}"]

    @property
    def final(self) -> dict[str, Any] | None:
        """The run's final record, once it has finished."""
        return final_record(read_metrics(self.directory))


def parse_grid(text: str) -> tuple[str, list[str]]:
    """'loss.alpha=0.7,0.8' -> ('loss.alpha', ['0.7', '0.8']); values that hold commas
    themselves (lists such as milestones) are separated by ';' instead. Settings that must
    change together are joined by '+', and so are their values:
    'teacher.arch+teacher.path=wrn34_10+a.pt,resnet18+b.pt'."""
    key, equals, values = text.partition("=")
    key = key.strip().removeprefix("--")
    if not equals or not all(KEY.match(k) for k in key.split("+")):
        raise argparse.ArgumentTypeError(f"{text!r}: write --grid section.key=v1,v2,... (e.g. "
                                         "loss.alpha=0.7,0.8,0.9)")
    items = [v.strip() for v in values.split(";" if ";" in values else ",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty value")
    if len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"{text!r}: a value given twice")
    width = len(key.split("+"))
    if any(len(item.split("+")) != width for item in items):
        raise argparse.ArgumentTypeError(f"{text!r}: each value needs {width} parts joined "
                                         "by '+', one per setting")
    return key, items


def plan(grid: list[tuple[str, list[str]]], out: Path) -> list[Run]:
    """Every combination of the grid, in the order given (the last key varies fastest)."""
    keys = [k for key, _ in grid for k in key.split("+")]
    if len(set(keys)) != len(keys):
        raise UserError(f"--grid names {', '.join(k for k in keys if keys.count(k) > 1)} twice")
    runs = []
    for combination in itertools.product(*(values for _, values in grid)):
        chosen = dict(zip([key for key, _ in grid], combination, strict=True))
        name = ",".join(f"{'+'.join(k.split('.', 1)[1] for k in key.split('+'))}={_safe(v)}"
                        for key, v in chosen.items())
        values = {k: v for key, value in chosen.items()
                  for k, v in zip(key.split("+"), value.split("+"), strict=True)}
        runs.append(Run(values, out / name, chosen))
    return runs


def _safe(value: str) -> str:
    """A value as a folder-name part (paths and fractions in values stay readable)."""
    return re.sub(r"[^\w.+-]", "_", value)


def check_settings(runs: list[Run], base: Sequence[str]) -> list[Settings]:
    """Every combination must be a valid training command (before hours of the others);
    the settings of each."""
    settings = []
    for run in runs:
        try:
            settings.append(load_settings(run.argv(base)))
        except UserError as err:
            raise UserError(f"{run.directory.name}: {err}") from None
    return settings


def check_inputs(runs: list[Run], settings: list[Settings]) -> None:
    """What each run still to train would refuse at its start besides its settings (the
    trainer's own checks of its run directory, data files and teacher file, run without
    reading the files), all in one error, so that no run trains for hours before another
    is found unable to start. A finished run is skipped by the sweep, so it is not checked."""
    todo = [(run, s) for run, s in zip(runs, settings, strict=True) if run.final is None]
    refused: dict[str, list[str]] = {}  # the trainer's message: the runs it refuses
    for run, s in todo:
        for message in _refusals(s):
            names = refused.setdefault(message, [])
            if run.directory.name not in names:
                names.append(run.directory.name)
    if not refused:
        return
    bad = len({name for names in refused.values() for name in names})
    said = [f"{f'all {len(todo)} runs' if len(names) == len(todo) > 1 else ', '.join(names)}"
            f": {message}" for message, names in refused.items()]
    raise UserError(f"{bad} of {len(todo)} runs to train would be refused at "
                    f"{'its' if bad == 1 else 'their'} start, so none was started: "
                    + "; ".join(said))


def _refusals(s: Settings) -> list[str]:
    """The messages of the trainer's start-up checks that `s` fails, in the trainer's order:
    a run directory it may not resume (fastibd.run_dir), the training and validation files
    (as fastibd.data.training_data reads them), the teacher file when the loss mode distils
    one (as fastibd.models.teachers.run_teacher finds it, before it loads anything)."""
    messages = []

    def check(refuse: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        try:
            refuse(*args, **kwargs)
        except UserError as err:
            messages.append(str(err))

    check(RunDirectory(s.training.out_dir).resumable, s.training.resume, tidy=False)
    for path in (s.data.train_path, s.data.val_path):
        check(dataset_file, path)
    if MODES[s.loss.mode].teacher:
        check(teacher_file, s.teacher, s.loss.mode, notes=False)  # the run prints its notes
    return messages

def collect(runs: list[Run], out: Path) -> list[dict[str, Any]]:
    """One row per run (finished or not) into out/results.csv; the rows."""
    keys = list(runs[0].swept) if runs else []
    rows = []
    for run in runs:
        records = read_metrics(run.directory)  # once per run
        final = final_record(records)
        best = [r for r in records if "holdout_pgd_acc" in r]
        rows.append({"run": run.directory.name, **run.swept,
                     "status": "done" if final else ("started" if best or
                                                      (run.directory / LAST).exists()
                                                      else "not started"),
                     "epochs": final["epoch"] if final else "",
                     "val_clean_acc": final["val_clean_acc"] if final else "",
                     "val_pgd_acc": final["val_pgd_acc"] if final else "",
                     "best_holdout_pgd_acc": max((r["holdout_pgd_acc"] for r in best),
                                                 default="")})
    with (out / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["run", *keys, "status", "epochs",
                                                  "val_clean_acc", "val_pgd_acc",
                                                  "best_holdout_pgd_acc"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def draw(rows: list[dict[str, Any]], keys: list[str], path: Path) -> bool:
    """Figure 2: validation PGD (solid) and clean (dashed) accuracy against each swept
    setting, one panel per setting, one line per value of the others. False when no run
    has finished (nothing to draw)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return False
    figure = Figure(figsize=(4.5 * len(keys), 3.6), layout="constrained")
    canvas = FigureCanvasAgg(figure)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(1, len(keys), index + 1)
        others = [k for k in keys if k != key]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in done:
            groups.setdefault(tuple(row[k] for k in others), []).append(row)
        numeric = all(isinstance(_number(r[key]), float) for r in done)
        for group, members in groups.items():
            if numeric:  # else categorical, in the order given
                members.sort(key=lambda r: _number(r[key]))
            xs = [_number(r[key]) if numeric else r[key] for r in members]
            label = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in zip(others, group,
                                                                          strict=True))
            line, = axes.plot(xs, [100 * r["val_pgd_acc"] for r in members], marker="o",
                              label=f"PGD {label}".strip())
            axes.plot(xs, [100 * r["val_clean_acc"] for r in members], marker="s",
                      linestyle="--", color=line.get_color(), label=f"clean {label}".strip())
        axes.set_xlabel(key)
        axes.set_ylabel("validation accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(f"sweep: {len(done)} of {len(rows)} runs finished", fontsize=9)
    canvas.print_png(str(path))
    return True


def _number(value: str) -> float | str:
    """A swept value as a number where it is one ('8/255' too), for the x axis."""
    try:
        return parse_number(value)
    except (ValueError, ZeroDivisionError):
        return value


def _train(argv: list[str]) -> int:
    """One run: in this process, or under torchrun as a child when it takes several
    processes (the trainer's own relaunch replaces the process: the sweep would end)."""
    from fastibd.distributed import process_count
    from fastibd.train.cli import main as train_main

    s = load_settings(argv)
    nproc = process_count(s.training.nproc, s.training.device, s.optim.lr_scaling)
    if nproc == 1:
        return train_main(argv)
    return run_child([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={nproc}", "-m", "fastibd.train", *argv])


def run_child(command: list[str]) -> int:
    """Run `command` (torchrun) to its end, passing it Ctrl-C and SIGTERM, each once; the
    trainer's exit code for a stop (130 / 143) when one came, since torchrun exits 1 when its
    workers stopped. In its own session: the terminal's Ctrl-C reaches it only through here,
    so that it is the one signal torchrun forwards to its workers, which save and exit."""
    child = subprocess.Popen(command, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in EXIT_CODES}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return EXIT_CODES[received[0]] if received else code


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0],
                            epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the recipe every run starts from")
    parser.add_argument("--grid", type=parse_grid, action="append", required=True,
                        metavar="KEY=V1,V2", help="a setting and its values (repeat for a "
                        "cross product; ';' separates values that contain commas)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the run directories, results.csv and sweep.png "
                             "(default: runs/sweep-CFG)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the runs and whether each is done; train nothing")
    parser.add_argument("--collect-only", action="store_true",
                        help="write results.csv and sweep.png from the runs as they are")
    return parser


@exit_on_user_error(PROG)
def main(argv: list[str] | None = None,
         train: Callable[[list[str]], int] | None = None) -> int:
    """The sweep command; `train` is the training command's main (the real one by default)."""
    args, overrides = build_parser().parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or o in ("--cfg",)]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}: overrides are --section.key=value")
    base = ["--cfg", args.cfg, *overrides]
    out = args.out or Path("runs") / f"sweep-{Path(args.cfg).stem}"
    runs = plan(args.grid, out)
    settings = check_settings(runs, base)
    if not args.collect_only:
        check_inputs(runs, settings)
    if args.dry_run:
        for index, run in enumerate(runs, 1):
            status = ("done" if run.final else
                      "resumes" if (run.directory / LAST).exists() else "to run")
            print(f"[{index}/{len(runs)}] {status:<7} python -m fastibd.train "
                  + " ".join(run.argv(base)))
        return 0
    writable_directory(out, "--out")
    if train is None:
        train = _train
    failed = []
    if not args.collect_only:
        for index, run in enumerate(runs, 1):
            if run.final is not None:
                print(f"[{index}/{len(runs)}] {run.directory.name}: done, skipped", flush=True)
                continue
            print(f"[{index}/{len(runs)}] {run.directory.name}", flush=True)
            code = train(run.argv(base))
            if code in STOPPED_CODES:
                print(f"{PROG}: interrupted; rerun the same command to continue",
                      file=sys.stderr)
                return code
            if code != 0:
                failed.append(run.directory.name)
                print(f"{PROG}: {run.directory.name} failed (exit {code}); going on",
                      file=sys.stderr)
    rows = collect(runs, out)
    drawn = draw(rows, [key for key, _ in args.grid], out / "sweep.png")
    print(f"wrote {out / 'results.csv'}" + (f" and {out / 'sweep.png'}" if drawn else
                                             " (no finished run to draw)"))
    if failed:
        print(f"{PROG}: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

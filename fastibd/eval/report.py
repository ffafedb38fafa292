"""Figures of a training run: `python -m fastibd.report RUN_DIR [--data VAL.beton] [--out DIR]`.

Writes PNGs (and figures.json with the numbers behind them) to DIR (default RUN_DIR/figures):
  curves.png      training curves from RUN_DIR/metrics.jsonl: losses, held-out clean and PGD
                  accuracy, learning rate;
  robustness.png  robust accuracy of RUN_DIR/best.pt vs eps and vs PGD steps (the IBD
                  paper's Figure 3), on the first --n images of --data;
  attention.png   the teacher-student attention matrix A[i, j] averaged over a batch (the
                  paper's Figure 4), from last.pt's attention module and the run's teacher.
A figure whose inputs are missing (no metrics, no data, not an IBD run, ...) is skipped with a
printed note.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import tqdm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from fastibd.cli import ArgumentParser, bounded, comma_list, parse_budget
from fastibd.data import dataset_file, first_examples
from fastibd.device import resolve_device
from fastibd.errors import UserError, exit_on_user_error
from fastibd.eval import attacks as eval_attacks
from fastibd.eval.robustness import budget_text
from fastibd.models import TappedModel, default_pipeline
from fastibd.models.teachers import load_teacher
from fastibd.run_dir import BEST, LAST, chosen_checkpoint, final_record, read_metrics

PROG = "fastibd.report"
DEFAULT_EPS_255 = (0, 1, 2, 4, 6, 8, 10, 12, 16)
DEFAULT_STEPS = (1, 2, 3, 5, 10, 20, 50)
EPS_CURVE_STEPS = 20
ATTENTION_BATCH = 128
DPI = 120


def note(message: str) -> None:
    print(f"note: {message}")


# ------------------------------------------------------------------- training curves


def _number(value: Any) -> float:
    """Metrics may hold 'nan' / 'inf' strings (JSON has no such numbers)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_curves(records: list[dict[str, Any]], path: Path) -> dict[str, Any] | None:
    """Losses, held-out accuracies and the learning rate per epoch; None if no epochs."""
    epochs = [r for r in records if r.get("kind", "epoch") == "epoch" and "epoch" in r]
    if not epochs:
        return None
    x = [r["epoch"] for r in epochs]

    def series(key: str) -> list[float]:
        return [_number(r.get(key)) for r in epochs]

    loss_keys = sorted({k for r in epochs for k in r if k.startswith("loss_")})
    acc_keys = [k for k in ("holdout_clean_acc", "holdout_pgd_acc") if any(k in r for r in epochs)]
    final = final_record(records)

    fig = _figure(15, 4.2)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    for key in loss_keys:
        ax_loss.plot(x, series(key), marker=".", label=key.removeprefix("loss_"))
    ax_loss.set(title="training losses", xlabel="epoch", ylabel="loss")
    if loss_keys:
        ax_loss.legend()
    labels = {"holdout_clean_acc": "held-out clean", "holdout_pgd_acc": "held-out PGD"}
    for key in acc_keys:
        ax_acc.plot(x, [100 * v for v in series(key)], marker=".", label=labels[key])
    if final is not None:  # the test-set numbers of the chosen checkpoint, as reference lines
        for key, style in (("val_clean_acc", ":"), ("val_pgd_acc", "--")):
            if key in final:
                ax_acc.axhline(100 * _number(final[key]), color="grey", linestyle=style,
                               label=f"final {key.removesuffix('_acc').replace('_', ' ')}")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if acc_keys or final is not None:
        ax_acc.legend()
    ax_lr.plot(x, series("lr"), marker=".")
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    _save(fig, path)
    return {"epochs": x, **{k: series(k) for k in [*loss_keys, *acc_keys, "lr"]}}


# ------------------------------------------------------------------- robustness curves


def accuracy_vs_eps(model: TappedModel, batches: Sequence[tuple[Tensor, Tensor]],
                    eps_values: Sequence[float], steps: int, seed: int,
                    norm: str = "linf") -> list[float]:
    """PGD-`steps` accuracy at each eps (step 2.5 eps / steps, Madry et al.); eps 0 = clean."""
    accuracies = []
    bar = _bar(len(eps_values) * len(batches), "accuracy vs eps")
    for eps in eps_values:
        correct = total = 0
        for index, (x, y) in enumerate(batches):
            if eps == 0:
                hit = eval_attacks.predict(model, x) == y
            else:
                hit = eval_attacks.pgd(model, x, y, eps, 2.5 * eps / steps, steps,
                                       seed=seed + index, norm=norm).correct
            correct += int(hit.sum())
            total += len(y)
            bar.update()
        accuracies.append(correct / total)
    bar.close()
    return accuracies


def accuracy_vs_steps(model: TappedModel, batches: Sequence[tuple[Tensor, Tensor]], eps: float,
                      step_size: float, steps: Sequence[int], seed: int,
                      norm: str = "linf") -> list[float]:
    """PGD-k accuracy for each k in `steps`, from one run of max(steps): with the same random
    start, PGD-k is the first k steps of the longer run (eval_attacks keeps every step)."""
    longest = max(steps)
    correct = torch.zeros(longest + 1)
    total = 0
    bar = _bar(len(batches), f"accuracy vs steps (PGD-{longest})")
    for index, (x, y) in enumerate(batches):
        result = eval_attacks.pgd(model, x, y, eps, step_size, longest, seed=seed + index,
                                  norm=norm)
        correct += result.correct_by_step.sum(dim=1).cpu().float()
        total += len(y)
        bar.update()
    bar.close()
    return [float(correct[k]) / total for k in steps]


def _bar(batches: int, what: str) -> tqdm.tqdm:
    """A progress bar on stderr, drawn on a terminal only (tqdm's disable=None)."""
    return tqdm.tqdm(total=batches, desc=what, unit="batch", file=sys.stderr, leave=False,
                     disable=None)


def plot_robustness(eps_values: Sequence[float], eps_acc: Sequence[float], eps_steps: int,
                    steps: Sequence[int], steps_acc: Sequence[float], steps_eps: float,
                    step_size: float, n: int, path: Path, norm: str = "linf") -> None:
    fig = _figure(11, 4.2)
    ax_eps, ax_steps = fig.subplots(1, 2)
    scale, unit = (1, "L2 radius") if norm == "l2" else (255, "x/255")
    name = "PGD-L2" if norm == "l2" else "PGD"
    ax_eps.plot([e * scale for e in eps_values], [100 * a for a in eps_acc], marker="o")
    ax_eps.set(title=f"{name}-{eps_steps} accuracy vs eps ({n} images)", xlabel=f"eps ({unit})",
               ylabel="accuracy (%)", ylim=(0, 100))
    ax_steps.plot(steps, [100 * a for a in steps_acc], marker="o")
    ax_steps.set(title=f"{name} accuracy vs steps (eps {budget_text(steps_eps, norm)}, step "
                       f"{budget_text(step_size, norm)})", xlabel=f"{name} steps",
                 ylabel="accuracy (%)", xscale="log", ylim=(0, 100))
    ax_steps.set_xticks(list(steps), [str(s) for s in steps])
    for ax in (ax_eps, ax_steps):
        ax.grid(alpha=0.3)
    _save(fig, path)


# ------------------------------------------------------------------- attention heat map


def mean_attention(teacher: TappedModel, student: TappedModel, features_state: dict[str, Any],
                   attention_dim: int, x: Tensor) -> Tensor:
    """A [n teacher taps, m student taps] averaged over the batch x (clean images)."""
    from fastibd.method.loss import FeatureDistillation

    with torch.no_grad():
        _, t_taps = teacher.eval()(x, features=True)
        _, s_taps = student.eval()(x, features=True)
        module = FeatureDistillation([t.shape[1] for t in t_taps], [s.shape[1] for s in s_taps],
                                     attention_dim, backend="eager").to(x.device)
        try:
            module.load_state_dict(features_state)
        except RuntimeError as err:
            raise UserError(f"the attention module in {LAST} does not fit these teacher/student "
                            f"taps ({str(err).splitlines()[0]})") from None
        attention, _ = module.eval().attention_and_distances(t_taps, s_taps)
    return attention.float().mean(dim=0).cpu()


def plot_attention(attention: Tensor, teacher_arch: str, student_arch: str, n: int,
                   path: Path) -> None:
    rows, cols = attention.shape
    fig = _figure(max(4.5, 0.55 * cols + 2.5), max(3.5, 0.45 * rows + 1.5))
    ax = fig.subplots()
    image = ax.imshow(attention.numpy(), cmap="viridis", aspect="auto", vmin=0)
    fig.colorbar(image, ax=ax, label="attention weight")
    ax.set(title=f"teacher-student attention (mean over {n} images)",
           xlabel=f"student tap j ({student_arch})", ylabel=f"teacher tap i ({teacher_arch})")
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    if rows * cols <= 160:  # small enough to print every weight
        for i in range(rows):
            for j in range(cols):
                value = float(attention[i, j])
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * float(attention.max()) else "black")
    _save(fig, path)


# ------------------------------------------------------------------- plumbing


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg backend straight to a file: no pyplot, no display, no global
    figure registry to leak."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def _read_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one line
        raise UserError(f"cannot read {path} ({str(err).splitlines()[0]})") from None
    return state if isinstance(state, dict) else None


def _data_settings(config: dict[str, Any], data: Path | None
                   ) -> tuple[Path | None, str, int, float | None]:
    """The validation file (--data, else the run's data.val_path), pipeline, resolution and
    center crop (the run's val_res and val_crop_ratio: what its own evaluation fed)."""
    section = config.get("data", {}) if isinstance(config, dict) else {}
    if data is None and section.get("val_path") and Path(section["val_path"]).is_file():
        data = Path(section["val_path"])
    crop_ratio = section.get("val_crop_ratio")
    return (data, section.get("pipeline", ""), int(section.get("val_res", 224)),
            None if crop_ratio is None else float(crop_ratio))


def _load_batches(data: Path, n: int, batch_size: int, device: torch.device, pipeline: str,
                  resolution: int, crop_ratio: float | None, workers: int
                  ) -> list[tuple[Tensor, Tensor]]:
    return [(x.clone(), y.clone()) for x, y in
            first_examples(data, pipeline, n, batch_size, device, resolution, workers,
                           crop_ratio)]


def _num_examples(data: Path) -> int:
    from fastibd.data import dataset_labels

    return len(dataset_labels(data))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory of fastibd.train")
    parser.add_argument("--data", type=Path, default=None,
                        help="validation .beton (or .npz) for the robustness and attention figures "
                             "(default: the run's data.val_path, if it exists)")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/figures")
    parser.add_argument("--n", type=bounded(int, 1), default=200,
                        help="images for the robustness curves (default: %(default)s)")
    parser.add_argument("--eps-list", default=",".join(map(str, DEFAULT_EPS_255)),
                        help="eps values in x/255 for the eps curve; for an L2 run, multiples "
                             "of the run's radius / 8 (default: %(default)s)")
    parser.add_argument("--steps-list", default=",".join(map(str, DEFAULT_STEPS)),
                        help="PGD step counts for the steps curve (default: %(default)s)")
    # strings here, numbers once the run's attack.norm is read: an L2 radius may exceed 1
    parser.add_argument("--eps", default=None,
                        help="eps of the steps curve, in the run's threat model (default: the "
                             "run's attack.eps, else 8/255)")
    parser.add_argument("--step-size", default=None,
                        help="PGD step of the steps curve (default: 2/255; for an L2 run, "
                             "eps / 4)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=200)
    parser.add_argument("--seed", type=bounded(int, 0), default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--workers", type=bounded(int, 1), default=2, help="FFCV threads")
    return parser


def _budget(text: str | None, name: str, norm: str) -> float | None:
    """--eps / --step-size as a number of the run's threat model (None: not given)."""
    if text is None:
        return None
    try:
        return parse_budget(text, norm)
    except argparse.ArgumentTypeError as err:
        raise UserError(f"{name} {err}") from None


def _int_list(text: str, name: str, low: int) -> list[int]:
    try:
        values = sorted({int(v) for v in comma_list(text)})
    except ValueError:
        raise UserError(f"{name} must be comma-separated integers, not {text!r}") from None
    if not values or values[0] < low:
        raise UserError(f"{name} needs integers >= {low}, got {text!r}")
    return values


@exit_on_user_error(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}")
    if args.data is not None:
        dataset_file(args.data)
    eps_255 = _int_list(args.eps_list, "--eps-list", 0)
    steps = _int_list(args.steps_list, "--steps-list", 1)
    if eps_255[-1] > 255:
        raise UserError(f"--eps-list is in x/255 and must stay <= 255, got {eps_255[-1]}")
    out: Path = args.out or run_dir / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror}") from None
    device = resolve_device(args.device, "--device")
    last = _read_state(run_dir / LAST)
    config = (last or {}).get("config") or {}
    data, pipeline, resolution, crop_ratio = _data_settings(config, args.data)
    attack = config.get("attack") or {}
    norm = attack.get("norm", "linf")  # the run's threat model: the curves' too
    asked_eps = _budget(args.eps, "--eps", norm)
    asked_step = _budget(args.step_size, "--step-size", norm)
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    written: list[Path] = []

    # 1. training curves
    torn: list[int] = []
    records = read_metrics(run_dir, skipped=torn)
    if torn:  # what a killed run leaves: the rest of the file is still good
        note(f"skipped unreadable line(s) {', '.join(map(str, torn))} of "
             f"{run_dir / 'metrics.jsonl'}")
    curves = plot_curves(records, out / "curves.png")
    if curves is None:
        note(f"no epoch records in {run_dir / 'metrics.jsonl'}: skipped the training curves")
    else:
        summary["curves"] = curves
        written.append(out / "curves.png")

    # 2. robustness vs eps and steps (the chosen checkpoint on validation images)
    ckpt = chosen_checkpoint(run_dir)
    if ckpt is None:
        note(f"no {BEST} or {LAST} in {run_dir}: skipped the robustness curves")
    elif data is None:
        recorded = (config.get("data") or {}).get("val_path") if isinstance(config, dict) else None
        tried = f" (the run's {recorded} is not there from {Path.cwd()})" if recorded else ""
        note(f"no validation data{tried}: give it with --data; skipped the robustness curves "
             "and the attention map")
    else:
        model = load_teacher(None, ckpt, device=device).to(memory_format=torch.channels_last)
        if not pipeline:
            pipeline = default_pipeline(model.spec.arch)
        n = min(args.n, _num_examples(data))
        batches = _load_batches(data, n, args.batch_size, device, pipeline, resolution,
                                crop_ratio, args.workers)
        run_eps = float(attack.get("eps", 8 / 255))
        attack_eps = asked_eps or run_eps
        # L2: the curve at the same fractions of the run's radius as x/255 is of 8/255
        eps_values = ([e / 255 for e in eps_255] if norm == "linf"
                      else [run_eps * e / 8 for e in eps_255])
        step_size = asked_step or (2 / 255 if norm == "linf" else attack_eps / 4)
        print(f"robustness curves: {ckpt.name} on {n} images of {data}", flush=True)
        eps_acc = accuracy_vs_eps(model, batches, eps_values, EPS_CURVE_STEPS, args.seed, norm)
        steps_acc = accuracy_vs_steps(model, batches, attack_eps, step_size, steps,
                                      args.seed, norm)
        plot_robustness(eps_values, eps_acc, EPS_CURVE_STEPS, steps, steps_acc, attack_eps,
                        step_size, n, out / "robustness.png", norm)
        summary["robustness"] = {
            "checkpoint": str(ckpt), "data": str(data), "n": n,
            "vs_eps": {"eps": eps_values, "steps": EPS_CURVE_STEPS, "norm": norm,
                       "step_size": "2.5 * eps / steps", "accuracy": eps_acc},
            "vs_steps": {"eps": attack_eps, "step_size": step_size, "steps": steps, "norm": norm,
                         "accuracy": steps_acc}}
        written.append(out / "robustness.png")

    # 3. attention heat map (IBD runs only)
    reason = _attention_missing(last, config, data)
    if reason:
        note(f"{reason}: skipped the attention map")
    else:
        try:
            summary["attention"] = attention_figure(run_dir, last, config, data, pipeline,
                                                    (resolution, crop_ratio), device,
                                                    args.workers, out / "attention.png")
            written.append(out / "attention.png")
        except UserError as err:  # the figures already drawn are still worth having
            note(f"{err}: skipped the attention map")

    if not written:
        raise UserError(f"nothing to draw from {run_dir}: no metrics, no checkpoint with "
                        "validation data (is it a run directory of fastibd.train?)")
    (out / "figures.json").write_text(json.dumps(summary, indent=1) + "\n")
    for path in written:
        print(f"wrote {path}")
    return 0


def attention_figure(run_dir: Path, last: dict[str, Any], config: dict[str, Any], data: Path,
                     pipeline: str, sizes: tuple[int, float | None], device: torch.device,
                     workers: int, path: Path) -> dict[str, Any]:
    """Load the run's teacher and last student, draw the mean attention; return its numbers."""
    teacher_cfg = config["teacher"]
    teacher = load_teacher(teacher_cfg.get("arch") or None, teacher_cfg["path"],
                           teacher_cfg.get("format", "auto"),
                           normalization=teacher_cfg.get("normalization") or None,
                           width_mult=float(teacher_cfg.get("width_mult", 1.0)),
                           trust_pickle=bool(teacher_cfg.get("trust_pickle", False)),
                           device=device)
    student = load_teacher(None, run_dir / LAST, device=device)
    if not pipeline:
        pipeline = default_pipeline(student.spec.arch)
    count = min(ATTENTION_BATCH, _num_examples(data))
    ((x, _),) = _load_batches(data, count, count, device, pipeline, *sizes, workers)
    attention = mean_attention(teacher, student, last["features"],
                               int(config["loss"]["attention_dim"]), x)
    plot_attention(attention, teacher.spec.arch, student.spec.arch, count, path)
    return {"n": count, "teacher": teacher.spec.arch, "student": student.spec.arch,
            "mean": attention.tolist()}


def _attention_missing(last: dict[str, Any] | None, config: dict[str, Any],
                       data: Path | None) -> str | None:
    """Why the attention map cannot be drawn, or None."""
    if last is None:
        return f"no {LAST}"
    if last.get("features") is None:
        return f"{LAST} has no attention module (not an IBD run with beta > 0)"
    teacher = config.get("teacher") or {}
    if not teacher.get("path"):
        return f"{LAST} names no teacher"
    if not Path(teacher["path"]).is_file():
        return f"the run's teacher {teacher['path']} is not there"
    if "attention_dim" not in (config.get("loss") or {}):
        return f"{LAST} has no loss.attention_dim"
    if data is None:
        return "no validation data"
    return None


if __name__ == "__main__":
    sys.exit(main())

"""A run as a RobustBench model: `python -m fastibd.export RUN_DIR --robustbench OUT.pt`.

Writes OUT.pt, a plain state_dict in the parameter names of the RobustBench class (for
ImageNet, torchvision's, as RobustBench uses it) that computes what the run's student
computes, and beside it OUT.MODEL_CARD.md and OUT.model_card.json (named after the export, so
exports sharing a folder keep their own cards): the recipe (config.yaml), the
teacher, the data, the evaluator's numbers (--report: a report.json of fastibd.evaluate on
the exported checkpoint) and the time and hardware metrics.jsonl recorded.

    python -m fastibd.evaluate --ckpt runs/cifar10_rn18/best.pt --data data/cifar10/val.beton \\
        --attacks clean,pgd20,aa --out runs/cifar10_rn18/report.json
    python -m fastibd.export runs/cifar10_rn18 --robustbench export/cifar10_rn18.pt \\
        --report runs/cifar10_rn18/report.json --wrap-normalization

Layouts of OUT.pt:
  plain            CIFAR networks trained with normalization none: the class's own keys
                   (RobustBench's CIFAR models take raw [0, 1] images)
  normalize_model  ImageNet networks, and CIFAR ones with --wrap-normalization: RobustBench's
                   normalize_model(model, mean, std), `normalize.mean`, `normalize.std` and the
                   class's keys under `model.`
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fastibd.cli import ArgumentParser, parse_number, writable_directory
from fastibd.errors import UserError, exit_on_user_error, require_file
from fastibd.eval.evaluate import PROG as EVALUATE_PROG
from fastibd.eval.robustness import attack_family, budget_text
from fastibd.method.modes import MODES
from fastibd.models import WIDE_RESNETS, ModelSpec, TappedModel, conventional_resolution
from fastibd.models.base import normalization_stats
from fastibd.models.checkpoint import atomic_save, atomic_write_text, sha256_file
from fastibd.models.teachers import load_checkpoint
from fastibd.run_dir import (
    BEST,
    CONFIG_FILE,
    LAST,
    METRICS_FILE,
    chosen_checkpoint,
    read_metrics,
)

PROG = "fastibd.export"
CARD_VERSION = 1
CARD_MD, CARD_JSON = "MODEL_CARD.md", "model_card.json"  # suffixes after the export's stem
ARCHITECTURES_MODULE = "robustbench.model_zoo.architectures"
NORMALIZE_MODEL = f"{ARCHITECTURES_MODULE}.utils_architectures"
NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class Counterpart:
    """The class a fastibd architecture's state_dict loads into key for key, computing the
    same function (same blocks, same shortcut inputs, same pooling at its resolution)."""

    module: str
    name: str  # the class (or torchvision function) to call
    arguments: str  # its arguments before num_classes, as Python source
    extra_imports: tuple[str, ...] = ()  # names from `module` the arguments use
    imagenet: bool = False  # RobustBench wraps it in normalize_model(model, mean, std)
    pooled: int = 0  # the fixed avg_pool2d window of a CIFAR class (its input must be 32 px)
    example: str = ""  # a RobustBench entry built on it, so people see it is the one they know

    def constructor(self, spec: ModelSpec) -> str:
        arguments = f"{self.arguments}, " if self.arguments else ""
        extra = ", sub_block1=True" if spec.options.get("sub_block1") else ""
        return f"{self.name}({arguments}num_classes={spec.num_classes}{extra})"

    def import_line(self) -> str:
        return f"from {self.module} import {', '.join((self.name, *self.extra_imports))}"


def _wide_resnet(depth: int, widen_factor: int) -> Counterpart:
    return Counterpart(f"{ARCHITECTURES_MODULE}.wide_resnet", "WideResNet",
                       f"depth={depth}, widen_factor={widen_factor}", pooled=8,
                       example="Zhang2019Theoretically" if (depth, widen_factor) == (34, 10)
                       else "")


# fastibd architecture -> its RobustBench counterpart. fastibd's pre-activation ResNet-18
# (final BN+ReLU, projection shortcuts on the activated input) is RobustBench's
# PreActResNet(PreActBlockV2, ..., bn_before_fc=True), not its PreActResNet18() (no final BN,
# shortcuts on the raw input): those weights would not even load there.
COUNTERPARTS: dict[str, Counterpart] = {
    "resnet18": Counterpart(f"{ARCHITECTURES_MODULE}.resnet", "ResNet", "BasicBlock, [2, 2, 2, 2]",
                            ("BasicBlock",), pooled=4),
    "resnet34": Counterpart(f"{ARCHITECTURES_MODULE}.resnet", "ResNet", "BasicBlock, [3, 4, 6, 3]",
                            ("BasicBlock",), pooled=4),
    "preact_resnet18": Counterpart(f"{ARCHITECTURES_MODULE}.resnet", "PreActResNet",
                                   "PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True",
                                   ("PreActBlockV2",), pooled=4,
                                   example="Rice2020OverfittingNetL2"),
    **{name: _wide_resnet(*shape) for name, shape in WIDE_RESNETS.items()},
    "resnet18_imagenet": Counterpart("torchvision.models", "resnet18", "", imagenet=True,
                                     example="Salman2020Do_R18"),
    "resnet50": Counterpart("torchvision.models", "resnet50", "", imagenet=True,
                            example="Salman2020Do_R50"),
}


# ----------------------------------------------------------------------------- the weights


def choose_checkpoint(run_dir: Path) -> tuple[Path, str]:
    """The run's chosen checkpoint (fastibd.run_dir.chosen_checkpoint), and why that one."""
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}" if not run_dir.exists() else
                        f"{run_dir} is a file, not a run directory")
    chosen = chosen_checkpoint(run_dir)
    if chosen is None:
        raise UserError(f"{run_dir} has no {BEST} or {LAST}: not a run directory of "
                        "fastibd.train, or its first epoch has not finished")
    if chosen.name == BEST:
        return chosen, "the best held-out PGD accuracy of the run"
    return chosen, (f"the run has no {BEST} (no held-out slice, or no held-out evaluation "
                    "yet): its last saved state")


def counterpart_of(spec: ModelSpec, path: Path, wrap_normalization: bool) -> Counterpart:
    """The RobustBench class for `spec`; a network none computes is refused in one line."""
    if spec.arch not in COUNTERPARTS:
        raise UserError(f"{path} holds a {spec.arch}, which has no RobustBench counterpart; "
                        f"exportable: {', '.join(COUNTERPARTS)}")
    counterpart = COUNTERPARTS[spec.arch]
    if spec.options.get("blurpool"):
        raise UserError(f"{path} was trained with model.blurpool=true: torchvision's "
                        f"{counterpart.name}, which RobustBench uses, does not blur before its "
                        "strided convolutions, so these weights would give other logits there")
    resolution = spec.resolution or conventional_resolution(spec.arch)
    if counterpart.pooled and resolution != 32:
        raise UserError(f"{path} was trained at {resolution} px; RobustBench's "
                        f"{counterpart.name} pools a fixed {counterpart.pooled}x"
                        f"{counterpart.pooled} map, so it takes 32 px images only")
    if (not counterpart.imagenet and not wrap_normalization
            and normalization_stats(spec.normalization) is not None):
        raise UserError(f"{path} normalizes its input ({spec.normalization}) inside the model, "
                        "and RobustBench's CIFAR models take raw [0, 1] images: pass "
                        "--wrap-normalization for RobustBench's normalize_model(model, mean, "
                        "std) layout (exact), or train with model.normalization=none (folding "
                        "it into the first convolution is not exact at its zero-padded borders)")
    return counterpart


def wrapped(counterpart: Counterpart, wrap_normalization: bool) -> bool:
    """Whether the export is normalize_model's layout (always for ImageNet networks)."""
    return counterpart.imagenet or wrap_normalization


def robustbench_state(model: TappedModel, wrap: bool) -> dict[str, torch.Tensor]:
    """The student's state_dict in the counterpart's names: fastibd's names are already the
    class's; normalize_model puts them under `model.` after its two buffers."""
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if not wrap:
        return state
    mean, std = input_statistics(model.spec)
    return {"normalize.mean": torch.tensor(mean).view(1, 3, 1, 1),
            "normalize.std": torch.tensor(std).view(1, 3, 1, 1),
            **{f"model.{key}": value for key, value in state.items()}}


def input_statistics(spec: ModelSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the model subtracts and divides by; normalization none is (0, 1)."""
    stats = normalization_stats(spec.normalization)
    return stats if stats is not None else ((0.0,) * 3, (1.0,) * 3)


def loading_code(counterpart: Counterpart, spec: ModelSpec, wrap: bool, file: str) -> str:
    """Python that builds the counterpart and loads `file` into it, without fastibd."""
    lines = ["import torch", counterpart.import_line()]
    model = counterpart.constructor(spec)
    if wrap:
        mean, std = input_statistics(spec)
        lines.append(f"from {NORMALIZE_MODEL} import normalize_model")
        model = f"normalize_model({model}, {tuple(mean)}, {tuple(std)})"
    lines += [f"model = {model}",
              f"model.load_state_dict(torch.load({file!r}, weights_only=True))",
              "model.eval()"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the card


def read_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml: the settings the run started with."""
    import yaml

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {CONFIG_FILE}: the model card needs the run's recipe "
                        "(is it a run directory of fastibd.train?)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds no settings")
    return config


def recipe_card(config: dict[str, Any]) -> dict[str, Any]:
    def section(name: str) -> dict[str, Any]:
        return _section(config, name)

    eps = section("attack").get("eps")
    return {"mode": section("loss").get("mode"), "arch": section("model").get("arch"),
            "width_mult": section("model").get("width_mult"),
            "normalization": section("model").get("normalization"),
            "train_path": section("data").get("train_path"),
            "val_path": section("data").get("val_path"),
            "holdout": section("data").get("holdout"),
            "eps": eps, "eps_255": _eps_text(eps, section("attack").get("norm", "linf")),
            "norm": section("attack").get("norm", "linf"),
            "epochs": section("training").get("epochs"), "seed": section("training").get("seed"),
            "config": config}


def teacher_card(config: dict[str, Any]) -> dict[str, Any] | None:
    """The run's teacher (None for a mode that trains without one): its path, and its sha256
    when the file is still there. A catalog name only when the settings carry one."""
    mode = MODES.get(str(_section(config, "loss").get("mode")))
    teacher = _section(config, "teacher")
    if mode is None or not mode.teacher or not teacher.get("path"):
        return None
    path = Path(teacher["path"])
    return {"path": str(path), "sha256": sha256_file(path) if path.is_file() else
            f"{NOT_RECORDED}: {path} is not there now",
            "arch": teacher.get("arch"), "format": teacher.get("format"),
            "normalization": teacher.get("normalization") or "from the file",
            "catalog_name": teacher.get("name") or None}


def _eps_text(eps: Any, norm: str) -> str:
    """A budget as config.yaml or a report holds it, as people write it (8/255 for Linf, the
    radius for L2: robustness.budget_text); as written when not a number."""
    try:
        return budget_text(parse_number(str(eps)), norm)
    except (ValueError, ZeroDivisionError):
        return str(eps)


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of config.yaml; empty when the file lacks it (a hand-written config)."""
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def read_report(path: Path, checkpoint: Path, checkpoint_sha256: str) -> dict[str, Any]:
    """The evaluator's numbers, refused when they are of another file than `checkpoint`."""
    require_file(path, "evaluation report", suffixes=(".json",))
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not JSON (a report.json of {EVALUATE_PROG}?)") from None
    if not isinstance(report, dict) or report.get("tool") != EVALUATE_PROG:
        raise UserError(f"{path} is not a report of {EVALUATE_PROG}")
    evaluated = report.get("checkpoint") or {}
    if evaluated.get("sha256") != checkpoint_sha256:
        raise UserError(f"{path} evaluated {evaluated.get('path')} (sha256 "
                        f"{str(evaluated.get('sha256'))[:12]}), not the exported {checkpoint} "
                        f"(sha256 {checkpoint_sha256[:12]}): run python -m {EVALUATE_PROG} "
                        f"--ckpt {checkpoint} ... --out {path}")
    return report


def evaluation_card(report: dict[str, Any], path: Path) -> dict[str, Any]:
    config, data = report.get("config") or {}, report.get("data") or {}
    attacks = {name: {key: row.get(key) for key in ("accuracy", "correct", "n", "settings")}
               for name, row in (report.get("attacks") or {}).items()}
    eps = config.get("eps")
    return {"report": str(path), "report_sha256": sha256_file(path),
            "created_utc": report.get("created_utc"),
            "checkpoint": report["checkpoint"], "data": data.get("path"),
            "num_examples": data.get("num_examples"), "dataset_size": data.get("dataset_size"),
            "eps": eps, "eps_255": _eps_text(eps, config.get("norm", "linf")),
            "norm": config.get("norm", "linf"),
            "precision": config.get("precision"),
            "device": (report.get("environment") or {}).get("device"),
            "headline": headline(attacks), "attacks": attacks, "robust": report.get("robust"),
            "flags": report.get("flags") or []}


def headline(attacks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Clean, the strongest PGD (most steps) and full AutoAttack: the numbers people quote."""
    pgd = []
    for name in attacks:
        try:
            family, steps = attack_family(name)
        except ValueError:  # a name this version does not know: listed, not quoted
            continue
        if family == "pgd":
            pgd.append((steps, name))
    chosen = {"clean": "clean", "pgd": max(pgd)[1] if pgd else None, "aa": "aa"}
    return {key: {"attack": name, "accuracy": attacks[name]["accuracy"]}
            if name in attacks else "not run" for key, name in chosen.items()}


def hardware_card(run_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Time and hardware as the run recorded them; what it did not record says so."""
    training = _section(config, "training")
    epochs = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]
    devices = [r["device"] for r in epochs if r.get("device")]
    device, source = NOT_RECORDED, None
    if devices:
        device, source = devices[-1], METRICS_FILE
    elif training.get("device") not in (None, "auto"):
        device, source = training["device"], f"{CONFIG_FILE} training.device"
    return {"device": device, "device_source": source,
            "precision": training.get("precision", NOT_RECORDED),
            "epochs_recorded": len(epochs),
            "images_per_s": _spread([r.get("images_per_s") for r in epochs]),
            "seconds_per_epoch": _spread([r.get("epoch_time_s") for r in epochs]),
            "training_seconds": _total([r.get("epoch_time_s") for r in epochs])}


def _numbers(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def _spread(values: list[Any]) -> dict[str, float] | str:
    numbers = _numbers(values)
    if not numbers:
        return NOT_RECORDED
    return {"mean": sum(numbers) / len(numbers), "min": min(numbers), "max": max(numbers),
            "epochs": len(numbers)}


def _total(values: list[Any]) -> float | str:
    numbers = _numbers(values)
    return sum(numbers) if numbers else NOT_RECORDED


# ----------------------------------------------------------------------------- markdown


def format_card(card: dict[str, Any]) -> str:
    """The .MODEL_CARD.md: what the .model_card.json holds, for a person."""
    export, model, source = card["export"], card["model"], card["source"]
    lines = [f"# {Path(export['path']).name}", "",
             f"A {model['arch']} ({model['num_classes']} classes) trained by fastibd in mode "
             f"`{card['recipe']['mode']}`, exported for RobustBench from `{source['checkpoint']}` "
             f"({source['why']}){_selection(source['recorded'])}.", "",
             "## Loading it (no fastibd needed)", "", "```python", export["loading_code"],
             "```", "", f"Inputs: {model['input']}.", "",
             *[f"Note: {note}.\n" for note in export["notes"]]]
    lines += _evaluation_lines(card["evaluation"])
    lines += _recipe_lines(card["recipe"], card["teacher"])
    lines += _hardware_lines(card["hardware"])
    lines += ["## Files", "", "| file | sha256 | bytes |", "| --- | --- | --- |",
              f"| `{export['path']}` | `{export['sha256']}` | {export['bytes']} |",
              f"| `{source['checkpoint']}` (source) | `{source['sha256']}` | {source['bytes']} |",
              ""]
    return "\n".join(lines)


def _selection(recorded: dict[str, Any]) -> str:
    """What the checkpoint recorded when the trainer kept it (held-out training images)."""
    held = recorded.get("holdout") or {}
    if "epoch" not in recorded or not {"clean_acc", "pgd_acc"} <= set(held):
        return ""
    return (f", epoch {recorded['epoch']}: {_percent(held['clean_acc'])} clean and "
            f"{_percent(held['pgd_acc'])} PGD on held-out training images (model selection, "
            "not a test number)")


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, int | float) else str(value)


def _evaluation_lines(evaluation: dict[str, Any] | str) -> list[str]:
    if isinstance(evaluation, str):
        return ["## Robustness", "", evaluation, ""]
    lines = ["## Robustness", "",
             f"From `{evaluation['report']}` ({EVALUATE_PROG}, {evaluation['created_utc']}): "
             f"the first {evaluation['num_examples']} of {evaluation['dataset_size']} images of "
             f"`{evaluation['data']}`, eps {evaluation['eps_255']} ({evaluation['norm']}), "
             f"{evaluation['precision']} on {evaluation['device']}. Its checkpoint (sha256 "
             f"`{evaluation['checkpoint']['sha256'][:12]}`) is the exported one.", "",
             "| attack | accuracy | correct / n | settings |", "| --- | --- | --- | --- |"]
    for name, row in evaluation["attacks"].items():
        lines.append(f"| {name} | {_percent(row['accuracy'])} | {row['correct']} / {row['n']} | "
                     f"{_settings_text(row.get('settings'))} |")
    robust = evaluation.get("robust") or {}
    if robust:
        lines.append(f"| robust | {_percent(robust.get('accuracy'))} | {robust.get('correct')} / "
                     f"{robust.get('n')} | correct under every attack: "
                     f"{', '.join(robust.get('attacks', []))} |")
    flags = evaluation["flags"]
    lines += ["", "Flags of the evaluator: " + ("none" if not flags else
                                                 "; ".join(f"{f.get('check')}: {f.get('message')}"
                                                           for f in flags)), ""]
    return lines


def _settings_text(settings: Any) -> str:
    """An attack's scalar settings in one cell (the nested ones stay in the JSON)."""
    if not isinstance(settings, dict):
        return ""
    shown = [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
             for key, value in settings.items() if isinstance(value, int | float | str)]
    return ", ".join(shown)


def _recipe_lines(recipe: dict[str, Any], teacher: dict[str, Any] | None) -> list[str]:
    rows = [("mode", recipe["mode"]),
            ("architecture", f"{recipe['arch']}, width {recipe['width_mult']}, normalization "
                             f"{recipe['normalization']}"),
            ("training data", recipe["train_path"]), ("validation data", recipe["val_path"]),
            ("held-out training images (model selection)", recipe["holdout"]),
            ("eps", f"{recipe['eps_255']} ({recipe['norm']})"), ("epochs", recipe["epochs"]),
            ("seed", recipe["seed"])]
    if teacher is None:
        rows.append(("teacher", f"none (mode {recipe['mode']} trains without one)"))
    else:
        rows += [("teacher", f"{teacher['path']} ({teacher['arch']}, format "
                             f"{teacher['format']}, normalization {teacher['normalization']})"),
                 ("teacher sha256", teacher["sha256"]),
                 ("teacher catalog name", teacher["catalog_name"] or "none given")]
    return ["## Recipe", "", *_table(rows),
            "", f"The whole configuration: the run's {CONFIG_FILE}, and `recipe.config` in "
            f"the {CARD_JSON} beside this card.", ""]


def _hardware_lines(hardware: dict[str, Any]) -> list[str]:
    def spread(value: Any, unit: str) -> str:
        if isinstance(value, str):
            return value
        return (f"{value['mean']:.4g} {unit} mean (min {value['min']:.4g}, max "
                f"{value['max']:.4g}) over {value['epochs']} epochs")

    total = hardware["training_seconds"]
    source = f" (from {hardware['device_source']})" if hardware["device_source"] else ""
    rows = [("device", f"{hardware['device']}{source}"), ("precision", hardware["precision"]),
            ("images/s", spread(hardware["images_per_s"], "images/s")),
            ("seconds per epoch", spread(hardware["seconds_per_epoch"], "s")),
            ("training time", total if isinstance(total, str) else f"{total:.4g} s over "
             f"{hardware['epochs_recorded']} epochs (training steps; held-out evaluation not "
             "included)")]
    return [f"## Training time and hardware ({METRICS_FILE})", "", *_table(rows), ""]


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "| --- | --- |", *[f"| {key} | {value} |" for key, value in rows]]


# ----------------------------------------------------------------------------- the command


def export_run(run_dir: Path, out: Path, report_path: Path | None,
               wrap_normalization: bool = False) -> dict[str, Any]:
    """Write OUT.pt and its two cards; return the card. Every check runs before any write."""
    check_out(out, run_dir)
    checkpoint, why = choose_checkpoint(run_dir)
    config = read_config(run_dir)
    loaded = load_checkpoint(None, checkpoint, "fastibd")
    spec = loaded.model.spec
    counterpart = counterpart_of(spec, checkpoint, wrap_normalization)
    checkpoint_sha = sha256_file(checkpoint)
    report = None if report_path is None else read_report(report_path, checkpoint, checkpoint_sha)
    wrap = wrapped(counterpart, wrap_normalization)

    atomic_save(robustbench_state(loaded.model, wrap), out)
    card = {
        "card_version": CARD_VERSION, "tool": PROG,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "export": export_card(out, counterpart, spec, wrap),
        "model": model_card(spec, wrap),
        "source": {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "why": why,
                   "sha256": checkpoint_sha, "bytes": checkpoint.stat().st_size,
                   "recorded": loaded.recorded},
        "recipe": recipe_card(config),
        "teacher": teacher_card(config),
        "evaluation": "not evaluated: no --report given" if report is None else
        evaluation_card(report, report_path),
        "hardware": hardware_card(run_dir, config),
    }
    card_md, card_json = card_paths(out)
    write_text(card_json, json.dumps(card, indent=2, allow_nan=False) + "\n")
    write_text(card_md, format_card(card))
    return card


def card_paths(out: Path) -> tuple[Path, Path]:
    """OUT.MODEL_CARD.md and OUT.model_card.json: one pair per export, even in a shared folder
    (RobustBench's model zoo keeps many models in one folder)."""
    return (out.with_name(f"{out.stem}.{CARD_MD}"), out.with_name(f"{out.stem}.{CARD_JSON}"))


def export_card(out: Path, counterpart: Counterpart, spec: ModelSpec,
                wrap: bool) -> dict[str, Any]:
    notes = []
    if spec.width_mult != 1:
        notes.append(f"width_mult {spec.width_mult}: RobustBench's class has the full widths, so "
                     "this file loads only into the same network with every width scaled (as "
                     "in tests), not into the class named")
    if counterpart.imagenet and spec.normalization != "imagenet":
        notes.append(f"normalization {spec.normalization}: RobustBench's own ImageNet loader "
                     "normalizes with ImageNet's statistics; a strict load_state_dict, as "
                     "below, takes this file's")
    return {"path": str(out), "sha256": sha256_file(out), "bytes": out.stat().st_size,
            "format": "state_dict", "layout": "normalize_model" if wrap else "plain",
            "robustbench": {"module": counterpart.module, "class": counterpart.name,
                            "constructor": counterpart.constructor(spec),
                            "normalize_model": wrap, "example_entry": counterpart.example or None},
            "exact_counterpart": spec.width_mult == 1,
            "loading_code": loading_code(counterpart, spec, wrap, out.name), "notes": notes}


def model_card(spec: ModelSpec, wrap: bool) -> dict[str, Any]:
    resolution = spec.resolution or conventional_resolution(spec.arch)
    mean, std = input_statistics(spec)
    inside = (f"normalized inside the exported model (mean {list(mean)}, std {list(std)})"
              if wrap else "no normalization (raw pixels)")
    return {**asdict(spec), "input_resolution": resolution,
            "input": f"RGB images in [0, 1], {resolution}x{resolution}, {inside}"}


def check_out(out: Path, run_dir: Path) -> None:
    """A .pt name in a writable folder, and never one of the run's own checkpoints."""
    if out.suffix != ".pt":
        raise UserError(f"--robustbench {out}: name the file .pt (RobustBench's model files are)")
    if out.is_dir():
        raise UserError(f"--robustbench {out} is a directory; give a file name such as "
                        f"{out}/model.pt")
    if any(out.resolve() == (run_dir / name).resolve() for name in (BEST, LAST)):
        raise UserError(f"--robustbench {out} is the run's own checkpoint; write the export "
                        "elsewhere")
    writable_directory(out.parent, "--robustbench folder", create=False)  # made when written


def write_text(path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)  # a card a reader finds is whole
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror}") from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run directory of fastibd.train")
    parser.add_argument("--robustbench", type=Path, required=True, metavar="OUT.pt",
                        help="write the run's best.pt (else last.pt) as a RobustBench "
                             f"state_dict; OUT.{CARD_MD} and OUT.{CARD_JSON} go beside it")
    parser.add_argument("--report", type=Path, default=None, metavar="REPORT.json",
                        help=f"report.json of {EVALUATE_PROG} on the exported checkpoint: "
                             "the card's robustness numbers")
    parser.add_argument("--wrap-normalization", action="store_true",
                        help="CIFAR networks trained with a normalization: write RobustBench's "
                             "normalize_model(model, mean, std) layout")
    return parser


@exit_on_user_error(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    card = export_run(args.run_dir, args.robustbench, args.report, args.wrap_normalization)
    export = card["export"]
    for note in export["notes"]:
        print(f"warning: {note}", file=sys.stderr)
    if args.report is None:
        print("note: no --report: the model card holds no robustness numbers", file=sys.stderr)
    print(f"exported    {card['source']['checkpoint']} ({card['source']['why']})")
    print(f"robustbench {export['robustbench']['constructor']}"
          + (" in normalize_model" if export["robustbench"]["normalize_model"] else ""))
    print(f"wrote       {export['path']}, " + ", ".join(map(str, card_paths(args.robustbench))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

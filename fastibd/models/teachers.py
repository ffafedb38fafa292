"""Load a (robust) teacher from the checkpoint files people actually have.

Formats (`format="auto"` recognises each from the file's contents):
  fastibd      this project's checkpoints (architecture and normalization inside)
  state_dict   a plain state_dict in our/torchvision's names (torchvision ResNets, the
               CIFAR ResNet code RSLAD/IBD/pyautoattack share); DataParallel's `module.`
               prefix is removed
  robustbench  RobustBench model files: optional 'state_dict' wrapper, `module.`/`model.`
               prefixes, and ImageNet models' `normalize.mean/std` buffers
  robustness   MadryLab robustness checkpoints: 'model' -> `module.model.*` (the attacker
               and normalizer copies are ignored; the normalizer gives the normalization)

Files load with `weights_only=True`. Some formats (robustness) are full pickles, which can
run arbitrary code when loaded: they load only with `trust_pickle=True`; so does a whole
pickled model (`torch.save(model)`), whose weights are then read as a state_dict.

Normalization, unless given: what the file carries; else 'imagenet' for ImageNet
architectures (torchvision's convention) and 'none' for CIFAR ones (RobustBench's). A given
one overrides the file's, with a note.

`teacher.name` names an entry of the teacher catalog (fastibd.models.catalog): it fills the
arch, format and normalization settings left at their defaults (a setting given explicitly
keeps its value, with a note when it differs from the catalog's), and the start-up check then
also compares the teacher's held-out accuracy with the entry's published clean accuracy.
"""

from __future__ import annotations

import math
import pickle
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastibd.chance import chance_bound
from fastibd.config import Choice, Flag, Number, Text, option, section
from fastibd.errors import UserError, first_line, require_file
from fastibd.models import (
    ARCHITECTURES,
    NORMALIZATIONS,
    WIDE_RESNETS,
    TappedModel,
    build_model,
    is_imagenet_arch,
)
from fastibd.models.base import Stats
from fastibd.models.catalog import FILE_FORMATS, CatalogEntry, CatalogName, catalog_entry
from fastibd.models.checkpoint import FORMAT as FASTIBD_FORMAT

FORMATS = ("auto", *FILE_FORMATS)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar")  # what a checkpoint file is named
_SHOWN = 4  # keys listed per kind of mismatch
NORMALIZATION_GAP = 0.15  # accuracy another normalization must add to be "the right one"
# How far below its published clean accuracy a catalog teacher may score before it is
# refused: 10 points, plus 3 standard errors of the measurement. Published figures are on
# the test set with the authors' preprocessing; a right file read the right way lands
# within a few points of them (a different subset, FFCV's JPEG and resize for ImageNet; on
# held-out *training* images it scores higher, not lower), while a wrong normalization or
# a wrong file costs tens of points.
PUBLISHED_DROP = 0.10


@section("teacher", "The robust teacher (distillation modes)")
class TeacherSettings:
    name: str = option(CatalogName(), "a teacher of the catalog (python -m fastibd.teachers "
                       "list): fills arch, format and normalization left at their defaults "
                       "and checks the published clean accuracy", "")
    arch: str = option(Text(), "architecture of the teacher checkpoint", "wrn34_10")
    path: str = option(Text(), "teacher checkpoint file", "")
    source: str = option(Text(), "how to get the teacher file (said when it is missing)", "")
    format: str = option(Choice(*FORMATS), "checkpoint layout", "auto")
    width_mult: float = option(Number(0.001, 64), "channel multiplier", 1.0)
    normalization: str = option(Text(), "override the teacher's input normalization (empty: "
                                "from the file, else the architecture's convention)", "")
    trust_pickle: bool = option(Flag(), "allow a full pickle (robustness-library files): it "
                                "can run code, so only for files you trust", False)


def run_teacher(settings: TeacherSettings, mode: str, num_classes: int) -> TappedModel:
    """The teacher a run's `teacher` section names (on the CPU, eval mode, no gradients),
    checked to predict `num_classes` classes. `mode` is the loss mode that asked for it."""
    settings = teacher_file(settings, mode)
    loaded = load_checkpoint(settings.arch, settings.path, settings.format,
                             normalization=settings.normalization or None,
                             width_mult=settings.width_mult, trust_pickle=settings.trust_pickle,
                             trust_option="--teacher.trust_pickle=true")
    for note in loaded.notes:
        print(f"note: teacher: {note}", file=sys.stderr, flush=True)
    teacher = loaded.model
    if teacher.spec.num_classes != num_classes:
        raise UserError(f"the teacher {settings.path} predicts {teacher.spec.num_classes} "
                        f"classes, the data has {num_classes}")
    return teacher


def teacher_file(settings: TeacherSettings, mode: str, notes: bool = True) -> TeacherSettings:
    """`settings` with its catalog entry filled in (with_catalog; `notes` as there), refused
    in one line unless teacher.path is a checkpoint file: no path (how to get one), no file
    there (a catalog teacher's: how to fetch it). Reads nothing: what run_teacher checks
    before it loads, and the sweep before its first run."""
    settings = with_catalog(settings, notes)
    if not settings.path:
        get = (f"get it with {settings.source}" if settings.name
               else "train one with loss.mode=pgd_at or trades")
        raise UserError(f"loss.mode={mode} distils from a teacher: set teacher.path ({get})")
    if settings.source and not Path(settings.path).is_file():
        raise UserError(f"no teacher checkpoint {settings.path}: {settings.source}")
    require_file(settings.path, "checkpoint file", suffixes=CHECKPOINT_SUFFIXES)
    return settings


def with_catalog(settings: TeacherSettings, notes: bool = True) -> TeacherSettings:
    """`settings` with what the catalog entry `settings.name` says filled into the arch,
    format and normalization left at their defaults (and `source`, said when the file is
    missing). An explicit setting wins; a note says when it differs from the catalog's
    (unless not `notes`)."""
    if not settings.name:
        return settings
    entry = catalog_entry(settings.name)
    defaults = {f.name: f.default for f in fields(TeacherSettings)}
    filled = {}
    for key, value in (("arch", entry.arch), ("format", entry.format),
                       ("normalization", entry.normalization),
                       ("source", entry.how_to_get(settings.path))):
        mine = getattr(settings, key)
        if mine == defaults[key]:
            filled[key] = value
        elif key != "source" and mine != value and notes:
            print(f"note: teacher: teacher.{key}={mine} overrides the catalog's {value} for "
                  f"{entry.name}", file=sys.stderr, flush=True)
    return replace(settings, **filled)


@torch.no_grad()
def accuracy_by_normalization(model: TappedModel,
                              batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                              alternatives: Iterable[str]) -> tuple[dict[str, float], int]:
    """(clean accuracy on `batches` (re-iterable) with the model's own normalization (first
    key) and with each of `alternatives`, the number of examples); the model keeps its own
    normalization afterwards."""
    configured = model.spec.normalization
    candidates = [configured] + [n for n in dict.fromkeys(alternatives)
                                 if n != configured and n in NORMALIZATIONS]
    accuracy = {}
    try:
        for normalization in candidates:
            model.set_normalization(normalization)
            correct = total = 0
            for x, y in batches:
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
            accuracy[str(normalization)] = correct / max(total, 1)
    finally:
        model.set_normalization(configured)
    return accuracy, total


def better_normalization(accuracy: dict[str, float]) -> str | None:
    """The normalization of `accuracy_by_normalization`'s result that beats the model's own
    (its first key) by NORMALIZATION_GAP, if one does."""
    mine = next(iter(accuracy.values()))
    best = max(accuracy, key=accuracy.get)
    return best if accuracy[best] > mine + NORMALIZATION_GAP else None


def check_teacher_accuracy(teacher: TappedModel,
                           batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                           alternatives: Iterable[str], num_classes: int, path: str,
                           name: str = "") -> None:
    """Stop before spending GPU-days when the teacher reads its input with the wrong
    normalization (one of `alternatives` does clearly better on `batches`), scores far below
    the published clean accuracy of the catalog entry `name` (when given), or cannot be
    told from guessing whatever the normalization (wrong file). `batches` must be
    re-iterable."""
    configured = teacher.spec.normalization
    accuracy, total = accuracy_by_normalization(teacher, batches, alternatives)
    mine, best = accuracy[str(configured)], better_normalization(accuracy)
    if best is not None:
        raise UserError(f"the teacher {path} gets {mine:.1%} of the held-out training "
                        f"images right with normalization {configured}, but "
                        f"{accuracy[best]:.1%} with {best}: set teacher.normalization={best}")
    below = published_shortfall(mine, total, catalog_entry(name)) if name else None
    if below:
        raise UserError(f"the teacher {path} gets {mine:.1%} of {total} held-out training "
                        f"images right (normalization {configured}); {below}")
    if mine < chance_bound(total, num_classes):
        raise UserError(f"the teacher {path} gets {mine:.1%} of {total} held-out training "
                        f"images right (chance is {1 / num_classes:.1%}): wrong checkpoint?")


def lowest_plausible_accuracy(published: float, total: int) -> float:
    """The lowest clean accuracy (a fraction) on `total` images that a right file, read the
    right way, may show against `published` (a fraction): PUBLISHED_DROP below it, less 3
    standard errors of a measurement on `total` images."""
    spread = 3 * math.sqrt(published * (1 - published) / max(total, 1))
    return max(published - PUBLISHED_DROP - spread, 0.0)


def published_shortfall(measured: float, total: int, entry: CatalogEntry) -> str | None:
    """Why a clean accuracy of `measured` on `total` images is too far below `entry`'s
    published one to be that teacher read the right way; None when it is not (or nothing
    is published)."""
    if entry.clean_acc is None:
        return None
    published = entry.clean_acc / 100
    lowest = lowest_plausible_accuracy(published, total)
    if measured >= lowest:
        return None
    return (f"{entry.name} is published at {published:.2%} clean ({entry.accuracy_source}), "
            f"and the right file read the right way scores at least {lowest:.1%} on {total} "
            f"images ({PUBLISHED_DROP * 100:.0f} points below, less sampling error): a wrong "
            f"file or a wrong normalization (the catalog's is {entry.normalization})")


@dataclass
class LoadedCheckpoint:
    """A model loaded from a file, with what the file says about it."""

    model: TappedModel
    format: str  # the layout it was read as
    # What a fastibd checkpoint recorded about its training: "holdout" (clean and PGD
    # accuracy on held-out training images, best.pt), "epoch". Empty for foreign files.
    recorded: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # worth telling the user (one line each)
    # The note said when the normalization asked for is not the one the file was saved with.
    normalization_override: str | None = None


def load_teacher(arch: str | None, path: str | Path, format: str = "auto", **kwargs: Any
                 ) -> TappedModel:
    """`load_checkpoint(...).model`: the model alone."""
    return load_checkpoint(arch, path, format, **kwargs).model


def load_checkpoint(
    arch: str | None,
    path: str | Path,
    format: str = "auto",
    *,
    num_classes: int | None = None,
    normalization: str | Stats | None = None,
    width_mult: float = 1.0,
    trust_pickle: bool = False,
    device: torch.device | str = "cpu",
    trust_option: str = "--trust-pickle",
    **options: Any,
) -> LoadedCheckpoint:
    """Build `arch` and load the weights in `path` into it, strictly.

    `arch` may be None for fastibd checkpoints (they name their architecture).
    `num_classes=None` reads it off the classifier's weights. `normalization` overrides what
    the file carries (with a note saying so). The model is in eval mode with requires_grad
    off, on `device`; its spec's resolution and crop ratio are what the file records (None if
    nothing).
    """
    if format not in FORMATS:
        raise UserError(f"unknown checkpoint format {format!r}; choose from {', '.join(FORMATS)}")
    notes: list[str] = []
    raw = _unwrap_module(read_checkpoint(path, trust_pickle, trust_option), path, notes)
    fmt = detect_format(raw) if format == "auto" else format
    state, stats, spec = _interpret(raw, fmt, path)

    resolution, crop_ratio, recorded = None, None, {}
    if spec is not None:  # our own checkpoint knows how to build itself
        if arch is not None and arch != spec["arch"]:
            raise UserError(f"{path} holds a {spec['arch']}, not a {arch}")
        arch, width_mult = spec["arch"], spec["width_mult"]
        options = {**spec.get("options", {}), **options}
        stats, resolution = spec["normalization"], spec.get("resolution")
        crop_ratio = spec.get("crop_ratio")
        num_classes = spec["num_classes"] if num_classes is None else num_classes
        recorded = {key: raw[key] for key in ("holdout", "epoch") if raw.get(key) is not None}
    if arch is None:
        raise UserError(f"say which architecture {path} holds ({', '.join(ARCHITECTURES)})")
    if arch in WIDE_RESNETS and any(k.startswith("sub_block1.") for k in state):
        options.setdefault("sub_block1", True)  # TRADES / AWP files carry this unused block
    if num_classes is None:
        num_classes = _infer_num_classes(state, path, fmt)
    normalization, override = _choose_normalization(normalization, stats, arch, path)
    notes += [override] if override else []

    model = build_model(arch, num_classes, normalization, width_mult, **options)
    _check_fit(model, state, f"{path} does not fit {arch} (num_classes={num_classes}, "
                             f"read as format {fmt!r})")
    model.load_state_dict(state, strict=True)
    model.spec = replace(model.spec, resolution=resolution, crop_ratio=crop_ratio)
    model.eval().requires_grad_(False)
    return LoadedCheckpoint(model.to(device), fmt, recorded, notes, override)


def read_checkpoint(path: str | Path, trust_pickle: bool = False,
                    trust_option: str = "--trust-pickle") -> Any:
    """torch.load with weights_only=True; a full pickle only when the user trusts it
    (`trust_option` is how the calling command spells the flag, for the message)."""
    path = require_file(path, "checkpoint file", suffixes=CHECKPOINT_SUFFIXES)
    unreadable = f"cannot read {path}: truncated or not a PyTorch checkpoint"
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols of bad bytes
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        needs = re.search(r"GLOBAL ([\w.]+)", str(err))
        if needs is None:  # not a question of trust: the bytes are bad (PyTorch's message
            # would suggest loading with weights_only=False: never say that for a bad file)
            raise UserError(unreadable) from None
        if not trust_pickle:
            raise UserError(
                f"{path} is a full pickle (it needs {needs.group(1)}); loading it can run "
                "arbitrary code. MadryLab robustness checkpoints are like this. If you trust "
                f"where it came from, pass {trust_option}") from None
    except Exception:  # noqa: BLE001 - foreign bytes fail the unpickler in assorted ways
        raise UserError(unreadable) from None
    try:  # only reached with trust_pickle=True
        import dill as pickle_module  # the robustness library pickles with dill
    except ImportError:
        pickle_module = pickle
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False,
                              pickle_module=pickle_module)
    except Exception as err:  # noqa: BLE001 - any failure of a foreign pickle is the file's
        raise UserError(f"cannot read {path} even as a trusted pickle ({first_line(err)})"
                        ) from None


def _unwrap_module(raw: Any, path: str | Path, notes: list[str]) -> Any:
    """A trusted pickle of a whole model (torch.save(model)): its weights, as a checkpoint of
    ours when it is one of our models, else as a state_dict."""
    if not isinstance(raw, nn.Module):
        return raw
    if isinstance(raw, TappedModel) and hasattr(raw, "spec"):
        notes.append(f"{path} is a whole pickled {type(raw).__name__}; loaded its weights")
        return {"format": FASTIBD_FORMAT, "spec": asdict(raw.spec), "model": raw.state_dict()}
    notes.append(f"{path} is a whole pickled {type(raw).__name__} module; loaded its "
                 "state_dict into the architecture named")
    return raw.state_dict()


def detect_format(raw: Any) -> str:
    if not isinstance(raw, Mapping):
        raise UserError(f"a checkpoint should hold a dict, this one holds a {type(raw).__name__}")
    if raw.get("format") == FASTIBD_FORMAT:
        return "fastibd"
    inner = raw.get("model")
    if isinstance(inner, Mapping) and any(str(k).startswith("module.model.") for k in inner):
        return "robustness"
    if "state_dict" in raw or any(str(k).startswith(("model.", "normalize.", "module.model."))
                                  for k in raw):
        return "robustbench"
    return "state_dict"


def _interpret(raw: Any, fmt: str, path: str | Path
               ) -> tuple[dict[str, torch.Tensor], Stats | None, dict | None]:
    """The state_dict in our names, the normalization the file carries, and our spec."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{path}: a checkpoint should hold a dict, not a {type(raw).__name__}")
    if fmt == "fastibd":
        if raw.get("format") != FASTIBD_FORMAT:
            raise UserError(f"{path} is not a fastibd checkpoint (no format marker)")
        return dict(raw["model"]), None, dict(raw["spec"])
    if fmt == "robustness":
        if not isinstance(raw.get("model"), Mapping):
            raise UserError(f"{path} is not a robustness checkpoint (no 'model' dict)")
        inner = raw["model"]
        state = _strip(inner, "module.model.", keep_only=True)
        stats = _stats(inner, "module.normalizer.new_mean", "module.normalizer.new_std")
        return state, stats, None
    state = raw.get("state_dict", raw) if fmt == "robustbench" else raw
    state = _strip(_strip(state, "module."), "model.") if fmt == "robustbench" else \
        _strip(state, "module.")
    stats = None
    for mean_key, std_key in (("normalize.mean", "normalize.std"), ("mu", "sigma"),
                              ("mean", "std")):
        if mean_key in state:
            stats = _stats(state, mean_key, std_key)
            state = {k: v for k, v in state.items() if k not in (mean_key, std_key)}
    return state, stats, None


def _strip(state: Mapping[str, Any], prefix: str, keep_only: bool = False) -> dict[str, Any]:
    """Remove `prefix` from keys that have it; with keep_only, drop keys without it."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif not keep_only:
            out[key] = value
    return out


def _stats(state: Mapping[str, Any], mean_key: str, std_key: str) -> Stats | None:
    if mean_key not in state or std_key not in state:
        return None
    mean, std = (tuple(float(v) for v in torch.as_tensor(state[k]).flatten())
                 for k in (mean_key, std_key))
    return mean, std  # type: ignore[return-value]


def _infer_num_classes(state: Mapping[str, torch.Tensor], path: str | Path, fmt: str) -> int:
    """The class count, off the classifier's weights (every architecture here names them
    linear.weight or fc.weight)."""
    for key in ("linear.weight", "fc.weight"):
        if key in state:
            return int(state[key].shape[0])
    keys = ", ".join(list(map(str, state))[:3]) or "none"
    raise UserError(f"{path} holds no classifier weights (linear.weight or fc.weight, read as "
                    f"format {fmt!r}; its first keys: {keys}): probably not a model "
                    "checkpoint, or not in that format")


def _choose_normalization(asked: str | Stats | None, carried: str | Stats | None, arch: str,
                          path: str | Path) -> tuple[str | Stats, str | None]:
    """(the normalization to build with, a note when the user's overrides the file's)."""
    carried = _name_stats(carried)
    if asked is not None:
        note = None
        if carried is not None and _name_stats(asked) != carried:
            note = (f"{path} was saved with normalization {carried}; using {asked} as asked "
                    "(accuracy will be wrong unless the file's is)")
        return asked, note
    if carried is not None:
        return carried, None
    return ("imagenet" if is_imagenet_arch(arch) else "none"), None


def _name_stats(normalization: str | Stats | None) -> str | Stats | None:
    """Give stats that match a named normalization its name, for readable specs."""
    if normalization is None or isinstance(normalization, str):
        return normalization
    for name, stats in NORMALIZATIONS.items():
        if stats is not None and all(abs(a - b) < 1e-3 for a, b in
                                     zip((*stats[0], *stats[1]), (*normalization[0],
                                                                  *normalization[1]),
                                         strict=True)):
            return name
    return normalization


def _check_fit(model: TappedModel, state: Mapping[str, torch.Tensor], context: str) -> None:
    """One readable error naming missing keys, unexpected keys and shape conflicts."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    conflicts = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{label} ({len(items)}): {', '.join(items[:_SHOWN])}"
                + (", ..." if len(items) > _SHOWN else "")
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape conflicts, file vs model", conflicts)) if items]
    if problems:
        hint = ""
        if conflicts and all(k.startswith(("linear.", "fc.")) for k in conflicts):
            hint = " (is num_classes right?)"
        elif conflicts:
            hint = " (is the architecture or width_mult right?)"
        raise UserError(f"{context}: " + "; ".join(problems) + hint)

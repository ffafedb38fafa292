"""Training configuration: fastargs sections, `--cfg NAME`, `--section.key=value` overrides.

    python -m fastibd.train --cfg cifar10_rn18 --optim.lr=0.05 --training.epochs 10

Resolution order: defaults < the recipe named by the config's `base:` key, if any <
configs/NAME.yaml (or a path) < command line. Every key is checked before any work starts:
an unknown key, an unknown config, or a value of the wrong type is one clear line
(UserError), not a traceback or a silently ignored typo.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import fastargs
from fastargs import Config, Param, Section
from fastargs.validation import Checker

from fastibd.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODES = ("ibd", "rslad", "kd", "trades", "pgd_at", "fast_at", "standard")


class Number(Checker):
    """A float that may be written as a fraction: eps 8/255, not 0.031 that means 7.9/255."""

    def __init__(self, low: float = float("-inf"), high: float = float("inf")) -> None:
        self.low, self.high = low, high

    def check(self, value: Any) -> float:
        number = parse_number(value) if isinstance(value, str) else float(value)
        if not self.low <= number <= self.high:
            raise ValueError(value)
        return number

    def help(self) -> str:
        return f"a number in [{self.low}, {self.high}] (8/255 works)"


def parse_number(text: str) -> float:
    """'8/255', '2.5/255', '0.031' or '1e-4' as a float (ValueError otherwise)."""
    numerator, slash, denominator = text.replace(" ", "").partition("/")
    return float(numerator) / float(denominator) if slash else float(numerator)


class Integer(Checker):
    def __init__(self, low: int | None = None) -> None:
        self.low = low

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        number = int(value)
        if self.low is not None and number < self.low:
            raise ValueError(value)
        return number

    def help(self) -> str:
        return "an integer" + (f" >= {self.low}" if self.low is not None else "")


class Flag(Checker):
    """true/false, yes/no, 1/0 (fastargs' own Bool makes the string 'false' true)."""

    WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

    def check(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        return self.WORDS[str(value).strip().lower()]

    def help(self) -> str:
        return "true or false"


class Choice(Checker):
    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def check(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError(value)
        return value

    def help(self) -> str:
        return "one of " + ", ".join(self.choices)


class Text(Checker):
    def check(self, value: Any) -> str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(value)
        return str(value)

    def help(self) -> str:
        return "a string"


class IntList(Checker):
    """Comma-separated integers (YAML lists work too): milestones 100,150."""

    def check(self, value: Any) -> tuple[int, ...]:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        return tuple(int(item) for item in items if str(item).strip() != "")

    def help(self) -> str:
        return "comma-separated integers"


def declare(config: Config) -> None:
    """All sections and parameters, with the paper's defaults (Kuang et al. 2023, CIFAR)."""

    def section(name: str, desc: str, **params: Param) -> None:
        Section(name, desc, config_descriptor=config).params(**params)

    section("data", "Datasets (.beton files from data_prep/write_ffcv.py)",
            train_path=Param(Text(), "training .beton", required=True),
            val_path=Param(Text(), "validation .beton (final report only, never model selection)",
                           required=True),
            pipeline=Param(Choice("cifar", "imagenet"), "augmentation: cifar = crop+flip, "
                           "imagenet = random resized crop+flip", default="cifar"),
            holdout=Param(Integer(0), "training images held out (never trained on) to pick the "
                          "best checkpoint by PGD accuracy", default=1000),
            batch_size=Param(Integer(1), "batch size per process", default=128),
            num_workers=Param(Integer(1), "FFCV decoding threads", default=8),
            os_cache=Param(Flag(), "let the OS cache the .beton (dataset fits in RAM)",
                           default=True),
            min_res=Param(Integer(8), "imagenet pipeline: training resolution (the start of "
                          "progressive resizing)", default=160),
            max_res=Param(Integer(0), "imagenet pipeline: final training resolution of "
                          "progressive resizing (0: no resizing)", default=0),
            start_ramp=Param(Integer(0), "progressive resizing: epoch the ramp from min_res "
                             "starts", default=0),
            end_ramp=Param(Integer(0), "progressive resizing: epoch max_res is reached",
                           default=0),
            res_step=Param(Integer(1), "progressive resizing: resolutions are multiples of this",
                           default=32),
            val_res=Param(Integer(8), "imagenet pipeline: validation resolution", default=224),
            val_crop_ratio=Param(Number(0.01, 1), "imagenet pipeline: validation center crop, "
                                 "as a fraction of the shorter side", default=224 / 256))
    section("model", "The student",
            arch=Param(Text(), "architecture (fastibd.models)", default="resnet18"),
            width_mult=Param(Number(0.001, 64), "channel multiplier", default=1.0),
            normalization=Param(Text(), "input normalization inside the model: cifar10, "
                                "cifar100, imagenet or none", default="cifar10"),
            blurpool=Param(Flag(), "ImageNet ResNets: blur before each strided convolution "
                           "(anti-aliasing, as FFCV's recipe)", default=False))
    section("teacher", "The robust teacher (distillation modes)",
            arch=Param(Text(), "architecture of the teacher checkpoint", default="wrn34_10"),
            path=Param(Text(), "teacher checkpoint file", default=""),
            source=Param(Text(), "how to get the teacher file (said when it is missing)",
                         default=""),
            format=Param(Choice("auto", "fastibd", "state_dict", "robustbench", "robustness"),
                         "checkpoint layout", default="auto"),
            width_mult=Param(Number(0.001, 64), "channel multiplier", default=1.0),
            normalization=Param(Text(), "override the teacher's input normalization "
                                "(empty: from the file, else the architecture's convention)",
                                default=""),
            trust_pickle=Param(Flag(), "allow a full pickle (robustness-library files): it can "
                               "run code, so only for files you trust", default=False))
    section("attack", "Training-time attack (pixel space, images in [0, 1])",
            eps=Param(Number(0, 1), "Linf budget", default=8 / 255),
            step_size=Param(Number(0, 1), "PGD step", default=2 / 255),
            steps=Param(Integer(1), "PGD steps", default=10),
            start=Param(Choice("normal", "uniform"), "start: x + 0.001 N(0,1) (authors' code) or "
                        "uniform in the ball", default="normal"),
            fgsm_alpha=Param(Number(0, 10), "fast_at / single-step: step = alpha * eps",
                             default=1.25),
            eval_steps=Param(Integer(1), "PGD steps for model selection on the held-out slice",
                             default=10),
            eval_step_size=Param(Number(0, 1), "PGD step for model selection (0: eps/4)",
                                 default=0))
    section("loss", "Objective",
            mode=Param(Choice(*MODES), "ibd (the paper), rslad, kd, trades, pgd_at, fast_at, "
                       "standard", default="ibd"),
            alpha=Param(Number(0, 1), "weight of the adversarial soft-label term (the paper: "
                        "0.9; the IBD code: 0.8; RSLAD: 5/6)", default=0.9),
            beta=Param(Number(0, 1e6), "weight of the feature-distillation term", default=0.8),
            temperature=Param(Number(0.01, 100), "soft-label temperature", default=1.0),
            attention_dim=Param(Integer(1), "query/key dimension of the attention module",
                                default=128),
            trades_beta=Param(Number(0, 1e6), "TRADES robustness weight", default=6.0),
            rslad_scale=Param(Number(0, 1e6), "rslad: factor on RSLAD's KL, which its code "
                              "averages over batch x classes (its CIFAR-100 scripts use 10)",
                              default=1.0),
            teacher_input=Param(Choice("natural", "adv"), "ibd: the input the teacher's taps "
                                "come from: natural (the IBD code) or adv (the paper's text); "
                                "soft labels always come from the natural input",
                                default="natural"),
            backend=Param(Choice("auto", "eager", "fused"), "feature-loss kernels: fused "
                          "Triton kernels on CUDA, eager reference elsewhere", default="auto"))
    section("optim", "SGD and the learning-rate schedule (per iteration)",
            lr=Param(Number(0, 100), "peak learning rate (for batch_size; scaled linearly "
                     "with the global batch if lr_scaling)", default=0.1),
            momentum=Param(Number(0, 1), "SGD momentum", default=0.9),
            nesterov=Param(Flag(), "Nesterov momentum", default=False),
            weight_decay=Param(Number(0, 1), "weight decay", default=5e-4),
            decay_norm_and_bias=Param(Flag(), "decay every parameter, as the IBD code and "
                                      "paper (false: not the 1-D ones, norm weights and "
                                      "biases, as FFCV's ImageNet recipe)", default=True),
            schedule=Param(Choice("piecewise", "onecycle", "linear", "constant"),
                           "piecewise: x gamma at milestones; onecycle: linear up to "
                           "peak_epoch then down to 0; linear: down to 0", default="piecewise"),
            milestones=Param(IntList(), "piecewise: epochs where lr *= gamma", default="100,150"),
            gamma=Param(Number(0, 1), "piecewise: factor at each milestone", default=0.1),
            peak_epoch=Param(Number(0, 1e6), "onecycle: epoch of the peak", default=2),
            lr_scaling=Param(Flag(), "scale lr by global batch / batch_size (several GPUs)",
                             default=False))
    section("training", "The run",
            epochs=Param(Integer(1), "epochs", default=200),
            seed=Param(Integer(0), "random seed (each rank adds its rank)", default=0),
            device=Param(Choice("auto", "cpu", "cuda"), "auto: cuda when available",
                         default="auto"),
            precision=Param(Choice("auto", "fp32", "bf16", "fp16"), "autocast dtype; auto: "
                            "bf16 on CUDA, fp32 on CPU", default="auto"),
            compile=Param(Choice("auto", "true", "false"), "torch.compile the models; auto: "
                          "on CUDA only", default="auto"),
            compile_mode=Param(Choice("default", "reduce-overhead", "max-autotune",
                                      "max-autotune-no-cudagraphs"), "torch.compile mode",
                               default="default"),
            out_dir=Param(Text(), "run directory: checkpoints, metrics, resolved config",
                          default="runs/default"),
            resume=Param(Flag(), "continue the run in out_dir if it has a checkpoint",
                         default=True),
            eval_every=Param(Integer(1), "evaluate on the held-out slice every N epochs",
                             default=1),
            nproc=Param(Text(), "processes (one per GPU) when not started by torchrun: auto "
                        "= every visible GPU (DDP), or a number", default="auto"),
            max_steps=Param(Integer(0), "stop each epoch after N steps (0: full epochs); for "
                            "quick trials", default=0))
    section("logging", "Output",
            progress=Param(Flag(), "tqdm progress bars", default=True),
            tensorboard=Param(Flag(), "also write TensorBoard event files (needs tensorboard)",
                              default=False))


def help_text() -> str:
    config = Config()
    declare(config)
    lines = ["usage: python -m fastibd.train --cfg NAME [--section.key=value ...]",
             "",
             "Train with Information Bottleneck Distillation (or a baseline mode).",
             "",
             "  --cfg NAME     configs/NAME.yaml (or a path to a YAML file)",
             "  --help         this text",
             "",
             f"configs: {', '.join(available_configs()) or '(none)'}"]
    for ns, paths in config.sections_to_entries.items():
        lines += ["", f"{'.'.join(ns)}: {config.sections[ns].desc}"]
        for path in paths:
            param = config.entries[path]
            default = "required" if param.required else f"default {param.default!r}"
            lines.append(f"  --{'.'.join(path):<26} {param.desc} ({param.checker.help()}; "
                         f"{default})")
    return "\n".join(lines)


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, available_configs(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            f"; available: {', '.join(available_configs())}"
        raise UserError(f"unknown config {name!r} (no {path}){hint}")
    return path


def parse_args(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """`--cfg NAME` and `--a.b=value` / `--a.b value` pairs; anything else is an error."""
    cfg, overrides, i = None, {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}; options look like --section.key=value")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        if key == "cfg":
            cfg = value
        else:
            overrides[key] = value
        i += 1
    return cfg, overrides


def load_config(argv: list[str]) -> Config:
    """Build, fill and validate a fresh config from the command line `argv`."""
    config = Config()
    declare(config)
    cfg, overrides = parse_args(argv)
    values: dict[str, Any] = {}
    if cfg is not None:
        values.update(_recipe_values(config_path(cfg)))
    values.update(overrides)
    known = {".".join(path) for path in config.entries}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else " (see --help)"
            raise UserError(f"unknown parameter {key!r}{hint}")
    config.collect(values)
    errors = config.validate(mode="errordict")
    if errors:
        path, error = next(iter(errors.items()))
        key = ".".join(path)
        param = config.entries[path]
        if isinstance(error, fastargs.exceptions.MissingValueError):
            raise UserError(f"{key} is required ({param.desc}); set it in the config or with "
                            f"--{key}=...")
        raise UserError(f"{key}: expected {param.checker.help()}, got {config.content[path]!r}")
    return config


def _recipe_values(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's flat values. A recipe that differs from another in a few lines names it
    with `base: NAME` and overrides what differs: the base's values come first."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise UserError(f"configs name each other as base in a loop: {chain}")
    tree = _read_yaml(path)
    base = tree.pop("base", None)
    values: dict[str, Any] = {}
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}: base should name one config, got {base!r}")
        values.update(_recipe_values(config_path(base), (*seen, path.resolve())))
    values.update(_flatten(tree, source=str(path)))
    return values


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UserError(f"{path} should hold sections of key: value pairs")
    return content


def _flatten(tree: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, source, f"{name}."))
        else:
            flat[name] = value
    return flat


def as_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The resolved values as {section: {key: value}}, for saving beside a run."""
    tree: dict[str, dict[str, Any]] = {}
    for path in config.entries:
        value = config[path]
        tree.setdefault(path[0], {})[".".join(path[1:])] = (
            list(value) if isinstance(value, tuple) else value)
    return tree

"""The settings of a training run: one typed section per concern, each declared beside the
code that reads it, loaded from configs/NAME.yaml and the command line (fastibd.config).

    python -m fastibd.train --cfg cifar10_rn18 --optim.lr=0.05 --training.epochs 10
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastibd import config
from fastibd.config import Choice, Flag, Integer, Text, option, section
from fastibd.data.options import DataSettings
from fastibd.method.attacks import AttackSettings
from fastibd.method.awp import AWPSettings
from fastibd.method.modes import LossSettings
from fastibd.models import ModelSettings
from fastibd.models.teachers import TeacherSettings
from fastibd.train.schedule import OptimSettings, check_optim

RECIPES = config.Recipes(Path(__file__).resolve().parents[2] / "configs")


@section("training", "The run")
class TrainingSettings:
    epochs: int = option(Integer(1), "epochs", 200)
    seed: int = option(Integer(0), "random seed (each rank adds its rank)", 0)
    device: str = option(Choice("auto", "cpu", "cuda"), "auto: cuda when available", "auto")
    precision: str = option(Choice("auto", "fp32", "bf16", "fp16"), "autocast dtype; auto: "
                            "bf16 on CUDA, fp32 on CPU", "auto")
    compile: str = option(Choice("auto", "true", "false"), "torch.compile the models; auto: on "
                          "CUDA only", "auto")
    compile_mode: str = option(Choice("default", "reduce-overhead", "max-autotune",
                                      "max-autotune-no-cudagraphs"), "torch.compile mode",
                               "default")
    out_dir: str = option(Text(), "run directory: checkpoints, metrics, resolved config",
                          "runs/default")
    resume: bool = option(Flag(), "continue the run in out_dir if it has a checkpoint", True)
    resume_changed: bool = option(Flag(), "resume even though settings that change the result "
                                  "differ from the run's (recorded in config_history.yaml)",
                                  False)
    eval_every: int = option(Integer(1), "evaluate on the held-out slice every N epochs", 1)
    nproc: str = option(Text(), "processes (one per GPU) when not started by torchrun: auto = "
                        "every visible GPU (DDP) if optim.lr_scaling, else one (batch_size is "
                        "per process), or a number", "auto")
    max_steps: int = option(Integer(0), "stop each epoch after N steps (0: full epochs); for "
                            "quick trials", 0)


@section("logging", "Output")
class LoggingSettings:
    progress: bool = option(Flag(), "tqdm progress bars", True)
    tensorboard: bool = option(Flag(), "also write TensorBoard event files (needs tensorboard)",
                               False)


@dataclass(frozen=True)
class Settings:
    """Everything a run is: what `--cfg` and the overrides resolve to."""

    data: DataSettings
    model: ModelSettings
    teacher: TeacherSettings
    attack: AttackSettings
    loss: LossSettings
    awp: AWPSettings
    optim: OptimSettings
    training: TrainingSettings
    logging: LoggingSettings

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {key: value}} in plain YAML types (config.yaml)."""
        return config.as_tree({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, tree: dict[str, dict[str, Any]]) -> Settings:
        """Settings from a {section: {key: value}} tree (a config.yaml), checked as the
        command line is."""
        flat = {f"{name}.{key}": value for name, values in tree.items()
                for key, value in values.items()}
        return cls(**config.fill(flat, SECTIONS))


SECTIONS = tuple(f.type if isinstance(f.type, type) else globals()[f.type]
                 for f in dataclasses.fields(Settings))


def load_settings(argv: list[str]) -> Settings:
    """The settings of `python -m fastibd.train ARGV` (--cfg NAME, --section.key=value)."""
    settings = Settings(**config.load(argv, SECTIONS, RECIPES))
    check_optim(settings.optim)
    return settings


def help_text() -> str:
    lines = ["usage: python -m fastibd.train --cfg NAME [--section.key=value ...]",
             "",
             "Train with Information Bottleneck Distillation (or a baseline mode).",
             "",
             "  --cfg NAME     configs/NAME.yaml (or a path to a YAML file)",
             "  --help         this text",
             "",
             f"configs: {', '.join(RECIPES.names()) or '(none)'}"]
    return "\n".join(lines + config.help_lines(SECTIONS))

"""Settings declared once, as typed sections; recipes (YAML) and `--section.key=value`.

A section is a frozen dataclass whose fields say their type check, help and default:

    @section("attack", "Training-time attack")
    class AttackSettings:
        eps: float = option(Number(0, 1), "Linf budget", 8 / 255)

Each lives beside the code that reads it (the attack settings in fastibd.method.attacks,
the optimizer's in fastibd.train.schedule, ...), so a builder takes exactly its section.
A command lists its sections; `load` fills them from defaults < the recipe named by a
config's `base:` key < configs/NAME.yaml (or a path) < the command line. fastargs is the
registry and parser; on top of it every key is checked before any work starts: an unknown
key, an unknown config, a value of the wrong type or a missing required value is one clear
line (UserError), not a traceback or a silently ignored typo.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import fastargs
from fastargs import Config, Param, Section
from fastargs.validation import Checker

from fastibd.cli import comma_list, parse_number
from fastibd.errors import UserError

T = TypeVar("T")
REQUIRED: Any = object()  # the default of an option that has none

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
        items = value if isinstance(value, list | tuple) else comma_list(str(value))
        return tuple(int(item) for item in items)

    def help(self) -> str:
        return "comma-separated integers"


def option(checker: Checker, help: str, default: Any = REQUIRED) -> Any:
    """A field of a settings section: how it is checked, what it means, its default (none:
    the option is required)."""
    required = default is REQUIRED
    return dataclasses.field(default=None if required else default,
                             metadata={"checker": checker, "help": help, "required": required})


def section(name: str, description: str) -> Callable[[type[T]], type[T]]:
    """Make a class a frozen settings dataclass named `name` in configs and on the command
    line (`--name.key=value`)."""

    def make(cls: type[T]) -> type[T]:
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.SECTION = name  # type: ignore[attr-defined]
        cls.DESCRIPTION = description  # type: ignore[attr-defined]
        return cls

    return make


def _declare(sections: Sequence[type]) -> Config:
    config = Config()
    for cls in sections:
        params = {}
        for field in dataclasses.fields(cls):
            meta = field.metadata
            params[field.name] = Param(meta["checker"], meta["help"], required=meta["required"],
                                       default=None if meta["required"] else field.default)
        Section(cls.SECTION, cls.DESCRIPTION, config_descriptor=config).params(**params)
    return config


class Recipes:
    """The YAML recipes of a command: CONFIG_DIR/NAME.yaml, or a path to a YAML file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.yaml"))

    def path(self, name: str) -> Path:
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            return path
        if path.is_file():  # a file, but not named as a recipe: say so, not "unknown"
            raise UserError(f"--cfg {name} is not a .yaml file: name a recipe "
                            f"({', '.join(self.names())}) or a path ending in .yaml")
        path = self.directory / f"{name}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; available: {', '.join(self.names())}"
            raise UserError(f"unknown config {name!r} (no {path}){hint}")
        return path

    def values(self, name: str) -> dict[str, Any]:
        return _recipe_values(self.path(name), self)


def load(argv: list[str], sections: Sequence[type], recipes: Recipes) -> dict[str, Any]:
    """{section name: filled section} from the command line `argv` (`--cfg NAME` and
    `--section.key=value` pairs), every value checked."""
    cfg, overrides = parse_args(argv)
    values: dict[str, Any] = recipes.values(cfg) if cfg is not None else {}
    values.update(overrides)
    return fill(values, sections)


def fill(values: dict[str, Any], sections: Sequence[type]) -> dict[str, Any]:
    """{section name: filled section} from flat {"section.key": value} pairs, every value
    checked (the same checks as the command line's)."""
    config = _declare(sections)
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
    return {cls.SECTION: cls(**{field.name: config[(cls.SECTION, field.name)]
                                for field in dataclasses.fields(cls)}) for cls in sections}


def help_lines(sections: Sequence[type]) -> list[str]:
    """Every option of `sections`: `--section.key  help (check; default)`."""
    config = _declare(sections)
    lines = []
    for ns, paths in config.sections_to_entries.items():
        lines += ["", f"{'.'.join(ns)}: {config.sections[ns].desc}"]
        for path in paths:
            param = config.entries[path]
            default = "required" if param.required else f"default {_shown(param.default)}"
            lines.append(f"  --{'.'.join(path):<26} {param.desc} ({param.checker.help()}; "
                         f"{default})")
    return lines


def as_tree(sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} with plain YAML types (tuples as lists), for config.yaml."""
    return {name: {key: list(value) if isinstance(value, tuple) else value
                   for key, value in dataclasses.asdict(values).items()}
            for name, values in sections.items()}


def _shown(value: Any) -> str:
    return repr(",".join(map(str, value)) if isinstance(value, tuple) else value)


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


def _recipe_values(path: Path, recipes: Recipes, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
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
        values.update(_recipe_values(recipes.path(base), recipes, (*seen, path.resolve())))
    values.update(_flatten(tree, source=str(path)))
    return values


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # where the parser gave up, 0-based
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}") from None
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

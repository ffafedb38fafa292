"""Argument parsing shared by the command-line tools: one-line errors, checked numbers,
budgets written as fractions, comma-separated lists."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from fastibd.errors import EXIT_USER_ERROR, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (plus a pointer to --help), and
    reads a negative fraction such as `-2/255` as a value (so the value's own check says
    what is wrong with it), not as an unknown option. A `prog` of `python -m NAME` (the
    usage line) is named NAME in errors, as `exit_on_user_error(NAME)` names it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d*\.?\d+(e-?\d+)?(/\d*\.?\d+)?$")

    def error(self, message: str) -> NoReturn:
        prog = self.prog.removeprefix("python -m ")
        print(f"{prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help followed by its default, unless the help already says it or there
    is none to say (None, or a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def bounded(kind: type, low: float | None = None, high: float | None = None) -> Callable:
    """An argparse `type` that parses `kind` and checks low <= value <= high."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {span}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parse_number(text: str) -> float:
    """'8/255', '2.5/255', '0.031' or '1e-4' as a float (ValueError otherwise)."""
    numerator, slash, denominator = text.replace(" ", "").partition("/")
    return float(numerator) / float(denominator) if slash else float(numerator)


def parse_budget(text: str, norm: str = "linf") -> float:
    """An eps or step size in pixel space for argparse: '8/255' or '0.031', in (0, 1]; with
    norm="l2" any finite number above 0 (an L2 radius: ImageNet's L2 eps is 3.0)."""
    try:
        value = parse_number(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (write e.g. 8/255 or "
                                         "0.031)") from None
    if norm == "l2":
        if not 0.0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is not above 0: an L2 budget is a finite "
                                             "radius in pixel space on [0, 1] images, e.g. 0.5")
        return value
    if not 0.0 < value <= 1.0:
        hint = ""
        if value == 255.0:
            hint = "; the whole pixel range is 1"
        elif 1.0 < value < 255.0:
            hint = f"; did you mean {text}/255?"
        raise argparse.ArgumentTypeError(
            f"{text} is outside (0, 1]: budgets are in pixel space on [0, 1] images{hint}")
    return value


def comma_list(text: str) -> list[str]:
    """'a, b,,a' -> ['a', 'b']: the items of a comma-separated option, stripped, empty ones
    and repeats dropped, in the order given."""
    return list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))


def choice_list(text: str, choices: Sequence[str], what: str) -> list[str]:
    """A comma-separated list of names out of `choices`, for argparse (at least one)."""
    items = comma_list(text)
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}"
                                         f": expected a comma-separated list of "
                                         f"{', '.join(choices)}")
    return items


def writable_directory(path: Path, option: str, create: bool = True) -> Path:
    """`path` checked to be a directory this process can write to (or, when it does not
    exist yet, one it can make: its nearest existing parent is a writable directory), before
    any slow work; made when `create`. `option` names the setting in the one-line error."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing} cannot be written to)"
        raise UserError(f"{option} {path} is not writable{where}")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create {option} {path}: {err.strerror}") from None
    return path


def writable_file(path: Path, option: str, make_folder: bool = False, example: str = "") -> Path:
    """`path` checked, before any slow work, to be a file this process can write: not a
    directory (`example`, a file name to suggest in it), not a read-only file, in a folder
    that exists (with `make_folder`: or that can be made; it is then made) and can be written
    to. `option` names the setting in the one-line error."""
    if path.is_dir():
        such_as = f"; give a file name such as {path / example}" if example else ""
        raise UserError(f"{option} {path} is a directory, not a file{such_as}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path} is not writable")
    folder = path.parent
    if not make_folder and not folder.exists():
        raise UserError(f"{option} {path}: folder {folder} does not exist")
    writable_directory(folder, f"{option} folder", create=make_folder)
    return path

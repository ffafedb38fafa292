"""Argument parsing shared by the command-line tools: one-line errors, checked numbers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from fastibd.errors import EXIT_USER_ERROR


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (plus a pointer to --help)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


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

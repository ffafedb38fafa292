"""User-facing errors: one clear line and a non-zero exit, never a traceback.

Code anywhere in the package raises `UserError` for a mistake the user can fix (a
missing file, a bad option, no network). Command-line entry points wrap their `main`
with `exit_on_user_error`, which prints `prog: error: message` and exits with status 2.
"""

from __future__ import annotations

import functools
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec

P = ParamSpec("P")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's convention for "killed by SIGINT"


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an error's text, colour codes removed (some libraries colour their
    messages), at most 200 characters: for quoting a library's error in a one-line one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    return (text.strip().splitlines() or [type(err).__name__])[0][:200]


def require_file(path: str | Path, what: str, hint: str = "",
                 suffixes: tuple[str, ...] = ()) -> Path:
    """`path` as a Path, checked to be an existing file; else a UserError naming `what` (and,
    for a directory, the files in it that end in one of `suffixes`, as suggestions)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
        suggestion = f" (did you mean {' or '.join(inside[:3])}?)" if inside else ""
        raise UserError(f"{path} is a directory, not a {what}{suggestion}")
    if not path.is_file():
        raise UserError(f"no {what} {path}{hint}")
    return path


@contextmanager
def interrupts_kept() -> Iterator[None]:
    """Ctrl-C inside raises KeyboardInterrupt as usual, and is also remembered: one that a
    library swallowed (a KeyboardInterrupt raised in a worker pool's callback is printed as
    "Exception ignored" and dropped) is raised again when the block ends."""
    if threading.current_thread() is not threading.main_thread():  # no handlers there
        yield
        return
    seen: list[int] = []

    def remember(signum: int, _frame) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if seen:
        raise KeyboardInterrupt


def exit_on_user_error(prog: str) -> Callable[[Callable[P, int | None]], Callable[P, int]]:
    """Decorate a CLI `main`: UserError and Ctrl-C become a one-line message and an exit code."""

    def decorate(main: Callable[P, int | None]) -> Callable[P, int]:
        @functools.wraps(main)
        def wrapped(*args: P.args, **kwargs: P.kwargs) -> int:
            try:
                return main(*args, **kwargs) or 0
            except UserError as err:
                print(f"{prog}: error: {err}", file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED

        return wrapped

    return decorate

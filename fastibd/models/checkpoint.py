"""fastibd's own checkpoint layout, and writing files so a crash never leaves half of one.

A checkpoint is a dict of tensors and plain values only, so `torch.load(weights_only=True)`
reads it: {"format": "fastibd", "version": 1, "spec": ModelSpec fields, "model": state_dict,
...anything else the trainer adds (optimizer, epoch, ...)}.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import torch

from fastibd.models import TappedModel

FORMAT = "fastibd"
VERSION = 1


def model_checkpoint(model: TappedModel, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict for `model` (which must come from `build_model`)."""
    return {"format": FORMAT, "version": VERSION, "spec": asdict(model.spec),
            "model": model.state_dict(), **extra}


def sha256_file(path: str | Path) -> str:
    """The file's sha256, hex (read in chunks: checkpoints are gigabytes)."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """`write(file)` into a temporary file in the same folder, then rename it over `path`: a
    file at `path` is always whole (the old one, or all of the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode any other new file gets (umask), so
        # a group sharing a cluster account can read its runs.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    return atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`path.write_text(text)` (UTF-8), atomically."""
    return atomic_write(path, lambda file: file.write(text.encode()))


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


"""Write an indexable image dataset to an FFCV .beton file, atomically and failing clearly.

FFCV's `DatasetWriter` runs the dataset in worker processes and waits until every
sample is counted; an exception in a worker would leave it waiting forever. So samples
are read through `_FailureGuard`, and stored through `_guarded_store` (FFCV's encoder
raises too, e.g. for a raw image larger than its 8 MiB page): the first error is recorded
in shared memory and the remaining samples become cheap placeholders; the writer
finishes, the partial file is deleted and the error is raised in the main process. The
file is written under a temporary name and renamed at the end, so a .beton that exists is
a complete one.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal
from unittest import mock

import numpy as np

from fastibd.data.ffcv_loaders import keep_torch_threads
from fastibd.data.sources import ImageDataset
from fastibd.errors import UserError, interrupts_kept

WriteMode = Literal["raw", "jpg", "proportion", "smart"]
WRITE_MODES: tuple[str, ...] = ("raw", "jpg", "proportion", "smart")
PARTIAL_SUFFIX = ".partial"

_MESSAGE_BYTES = 4096
SMART_THRESHOLD = 256 * 256 * 3  # bytes: in smart mode, images of more pixels than 256x256 are JPEG
_PLACEHOLDER = (np.zeros((1, 1, 3), dtype=np.uint8), 0)


class _FailureGuard:
    """Reads samples for FFCV's worker processes; remembers the first failure."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset
        self.message = mp.Array(ctypes.c_char, _MESSAGE_BYTES)
        self.main_pid = os.getpid()
        self.worker_ready = False

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not self.worker_ready and os.getpid() != self.main_pid:
            # Ctrl-C is handled by the main process, which terminates the workers.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.worker_ready = True
        if self.message.value:
            return _PLACEHOLDER
        try:
            image, label = self.dataset[index]
            _check_sample(image, index)
            return image, label
        except Exception as err:  # noqa: BLE001 - anything a sample raises must reach the user
            self.record(str(err))
            return _PLACEHOLDER

    def record(self, message: str) -> None:
        with self.message.get_lock():
            if not self.message.value:
                self.message.value = message.encode()[: _MESSAGE_BYTES - 1]

    def failure(self) -> str | None:
        return self.message.value.decode(errors="replace") or None


def _check_sample(image: np.ndarray, index: int) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"sample {index}: expected a uint8 HxWx3 image, got "
                        f"{image.dtype} {image.shape}")


def image_field(
    write_mode: WriteMode = "raw",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    smart_threshold: int = SMART_THRESHOLD,
):
    """FFCV's RGB image field with the options of its ImageNet recipe exposed. `smart` stores
    as JPEG the images whose raw pixels exceed `smart_threshold` bytes (FFCV's smart mode
    without a threshold stores every image raw)."""
    keep_torch_threads()
    from ffcv.fields import RGBImageField

    if write_mode not in WRITE_MODES:
        raise UserError(f"write mode must be one of {', '.join(WRITE_MODES)}, not {write_mode!r}")
    return RGBImageField(
        write_mode=write_mode,
        max_resolution=max_resolution,
        jpeg_quality=jpeg_quality,
        compress_probability=compress_probability,
        smart_threshold=smart_threshold,
    )


def write_beton(
    dataset: ImageDataset,
    path: Path,
    *,
    image=None,
    indices: Sequence[int] | None = None,
    num_workers: int = -1,
    overwrite: bool = False,
    chunksize: int = 100,
    progress: bool = True,
) -> Path:
    """Write `dataset` (or the given `indices` of it) as fields `image` and `label` to `path`.

    `image` is an FFCV image field (default: raw RGB). `progress=False` silences FFCV's own
    progress bar. Returns `path`.
    """
    keep_torch_threads()
    from ffcv import writer as ffcv_writer
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    if len(dataset) == 0 or (indices is not None and len(indices) == 0):
        raise UserError(f"nothing to write to {path}: the dataset is empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    guard = _FailureGuard(dataset)
    fields = {"image": image if image is not None else image_field(), "label": IntField()}
    writer = DatasetWriter(str(partial), fields, num_workers=num_workers)
    # FFCV draws its bar with the tqdm it imported and offers no switch for it.
    bar = ffcv_writer.tqdm if progress else functools.partial(ffcv_writer.tqdm, disable=True)
    store = _guarded_store(ffcv_writer.handle_sample, guard)
    try:
        # Forked workers, whatever the default start method (forkserver from Python 3.14):
        # the guarded encoder is patched here and reaches them only through a fork.
        with mock.patch.object(ffcv_writer, "tqdm", bar), \
                mock.patch.object(ffcv_writer, "handle_sample", store), \
                mock.patch.object(ffcv_writer, "Process", mp.get_context("fork").Process), \
                interrupts_kept():
            writer.from_indexed_dataset(
                guard, indices=None if indices is None else list(indices), chunksize=chunksize
            )
        failure = guard.failure()
        if failure is not None:
            raise UserError(failure)
        os.replace(partial, path)
    except BaseException:
        _stop_workers(writer)
        raise
    finally:
        partial.unlink(missing_ok=True)
    return path


def _guarded_store(handle_sample: Callable[..., None],
                   guard: _FailureGuard) -> Callable[..., None]:
    """FFCV's per-sample encoder, with its errors recorded instead of killing the worker
    (a dead worker never reports its samples, and DatasetWriter then waits forever)."""

    def store(sample: tuple, dest_ix: int, *args: object) -> None:
        if guard.message.value:
            return
        try:
            handle_sample(sample, dest_ix, *args)
        except Exception as err:  # noqa: BLE001 - e.g. a raw image larger than a page
            hint = (" (FFCV stores an image in one 8 MiB page: lower --max-resolution or use "
                    "--write-mode jpg)" if "page size" in str(err) else "")
            guard.record(f"sample {dest_ix} of the write could not be stored: {err}{hint}")

    return store


def _stop_workers(writer) -> None:
    """After a failure or Ctrl-C: end FFCV's worker processes and free its shared memory."""
    for child in mp.active_children():
        child.terminate()
        child.join(timeout=5)
    shared = getattr(writer, "metadata_sm", None)
    if shared is not None and hasattr(shared, "unlink"):
        try:
            shared.close()
            shared.unlink()
        except FileNotFoundError:  # FFCV already released it
            pass

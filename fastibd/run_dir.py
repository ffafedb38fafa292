"""A run directory, as fastibd.train writes it and fastibd.report reads it:

    config.yaml          the settings the run started with (written once, never rewritten)
    config_history.yaml  one entry per resume that changed a setting (what, from, to)
    metrics.jsonl        one JSON line per epoch (and a final one); TensorBoard events optional
    last.pt              the whole training state, written atomically every epoch and on Ctrl-C
    best.pt              the student with the best PGD accuracy on the held-out training images
    .lock                held by the one trainer using the directory (an OS lock: it dies with
                         its process, so a killed run never leaves a stale one)

Files are written to a temporary name and renamed, so a file that exists is complete; the
temporaries a killed write leaves (.last.pt.*.tmp) are removed when the run is next opened.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastibd.cli import writable_directory
from fastibd.errors import UserError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.yaml"
LOCK_FILE = ".lock"
LAST, BEST = "last.pt", "best.pt"
TEMPORARY_GLOB = ".*.tmp"  # what atomic writes leave when killed between write and rename


class RunDirectory:
    """The directory of one training run, checked and locked before any work."""

    def __init__(self, path: str | Path) -> None:
        if not str(path).strip():
            raise UserError("training.out_dir is empty: name the run directory (it is where "
                            "checkpoints and metrics go)")
        self.path = Path(path)
        self.made = False
        self._lock_file = None

    def check_writable(self) -> None:
        """A directory that exists or can be made, and can be written to."""
        writable_directory(self.path, "training.out_dir")

    def check_free_space(self, needed: int) -> None:
        """Room for one more checkpoint of `needed` bytes (a write goes to a temporary file
        beside the old one before the rename)."""
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise UserError(f"{self.path} has {free / 2**20:.0f} MiB free; a checkpoint of this "
                            f"run needs {needed / 2**20:.0f} MiB")

    def lock(self) -> None:
        """Hold the directory for this process (making it if needed); another trainer there
        is one line that says which process holds it."""
        self.made = not self.path.exists()
        self.check_writable()
        file = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 - held for the run's life
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UserError(f"{self.path} is in use by another trainer ({holder}); wait for it "
                            "to finish or choose another training.out_dir") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._lock_file = file

    def unlock(self, failed: bool = False) -> None:
        """Release the lock. After a run that `failed` to start, a directory this object
        made and nothing else wrote to is removed again: a refused run leaves no trace."""
        if self._lock_file is None:
            return
        self._lock_file.close()  # closing the descriptor releases the lock
        self._lock_file = None
        if failed and self.made and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink()
            self.path.rmdir()

    def remove_temporaries(self) -> list[Path]:
        """Delete what interrupted atomic writes left; the lock says no write is running."""
        leftovers = sorted(self.path.glob(TEMPORARY_GLOB))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def resumable(self, resume: bool, tidy: bool = True) -> Path | None:
        """last.pt when the run resumes, None when it starts. A directory that holds a run is
        refused unless `resume`, so no run is overwritten by mistake. `tidy` (the process
        holding the lock): remove what writes a killed run left half done."""
        last = self.path / LAST
        if last.exists() and not resume:
            raise UserError(f"{self.path} already holds a run ({last}); choose another "
                            "training.out_dir, or resume it with training.resume=true")
        if tidy:
            self.remove_temporaries()
        return last if last.exists() else None

    def begin(self, settings: dict[str, Any], changes: dict[str, tuple[Any, Any]],
              epoch: int, step: int, tensorboard: bool = False) -> RunLog:
        """The metrics log of a run starting or resuming at (epoch, step): config.yaml once,
        and a resume's setting `changes` in config_history.yaml and the log."""
        self.write_config(settings)
        log = RunLog(self.path, tensorboard)
        if changes:
            self.record_changes(changes, epoch, step)
            log.write_resume(changes, epoch, step)
        return log

    def write_config(self, settings: dict[str, Any]) -> None:
        """config.yaml, once: the settings the run started with."""
        import yaml

        if not (self.path / CONFIG_FILE).exists():
            (self.path / CONFIG_FILE).write_text(yaml.safe_dump(settings, sort_keys=False))

    def record_changes(self, changes: dict[str, tuple[Any, Any]], epoch: int,
                       step: int) -> None:
        """Append one resume's setting changes to config_history.yaml."""
        import yaml

        entry = {"resumed": datetime.now(UTC).isoformat(timespec="seconds"), "epoch": epoch,
                 "step_in_epoch": step,
                 "changes": {key: {"from": old, "to": new} for key, (old, new) in
                             changes.items()}}
        with (self.path / HISTORY_FILE).open("a") as file:
            file.write(yaml.safe_dump([entry], sort_keys=False))


class RunLog:
    """Appends one JSON object per record; a resumed run keeps appending to the same file."""

    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.path = run_dir / METRICS_FILE
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard=true needs the tensorboard package "
                                "(pip install tensorboard)") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        clean = {key: _plain(value) for key, value in record.items()}
        with self.path.open("a") as file:
            file.write(json.dumps(clean) + "\n")
        if self.writer is not None and "epoch" in clean:
            for key, value in clean.items():
                if isinstance(value, int | float) and key != "epoch":
                    self.writer.add_scalar(f"{clean.get('kind', 'epoch')}/{key}", value,
                                           clean["epoch"])
            self.writer.flush()

    def write_resume(self, changes: dict[str, tuple[Any, Any]], epoch: int,
                     step_in_epoch: int) -> None:
        """The record of a resume that changed settings (config_history.yaml has them too)."""
        self.write({"kind": "resume", "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "changes": {k: [old, new] for k, (old, new) in changes.items()}})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def chosen_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint that stands for a run: best.pt (the best held-out PGD accuracy), else
    last.pt (no held-out slice, or none evaluated yet); None when it has neither."""
    return next((run_dir / name for name in (BEST, LAST) if (run_dir / name).is_file()), None)


def epoch_line(record: dict[str, Any]) -> str:
    """The console line of an epoch record: its loss parts, held-out accuracy, lr, speed."""
    parts = [f"epoch {record['epoch']}"]
    parts += [f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss_")]
    if "holdout_clean_acc" in record:
        parts += [f"held-out clean {record['holdout_clean_acc']:.2%}",
                  f"PGD {record['holdout_pgd_acc']:.2%}"]
    parts += [f"lr {record['lr']:.4g}", f"{record['images_per_s']:.0f} img/s"]
    return "  ".join(parts)


def read_metrics(run_dir: str | Path, skipped: list[int] | None = None
                 ) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A line that is not JSON (the torn last line a killed
    run leaves) is skipped; its line number goes to `skipped` when given."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if skipped is not None:
                skipped.append(number)
    return records


def _plain(value: Any) -> Any:
    """JSON-safe: tensors to numbers, NaN/inf to strings (JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def final_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last record of kind "final" of a run's metrics (None: it has not finished)."""
    return next((r for r in reversed(records) if r.get("kind") == "final"), None)

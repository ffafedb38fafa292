"""A run directory, as fastibd.train writes it and fastibd.report reads it:

    config.yaml     the resolved settings
    metrics.jsonl   one JSON line per epoch (and a final one); TensorBoard events optional
    last.pt         the whole training state, written atomically every epoch and on Ctrl-C
    best.pt         the student with the best PGD accuracy on the held-out training images
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastibd.errors import UserError

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
LAST, BEST = "last.pt", "best.pt"


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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    """JSON-safe: tensors to numbers, NaN/inf to strings (JSON has neither)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value

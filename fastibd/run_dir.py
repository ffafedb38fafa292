"""Per-epoch metrics of a run: JSON lines in RUN_DIR/metrics.jsonl (and TensorBoard)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastibd.errors import UserError

METRICS_FILE = "metrics.jsonl"


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

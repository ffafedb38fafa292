"""One epoch's training metrics: loss parts summed on the device (no sync per step), steps,
images and time; carried across a mid-epoch stop (`partial()`, saved with the training
state) and summed over the processes at the end (`metrics()`)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from fastibd.distributed import World, all_reduce_sum


class EpochMeter:
    def __init__(self, device: torch.device, earlier: dict[str, Any] | None = None) -> None:
        """`earlier`: what the stopped part of this epoch measured (a resumed epoch's
        `partial()`), so its record covers the whole epoch."""
        earlier = earlier or {}
        self.device = device
        self.sums = {k: torch.tensor(v, device=device) for k, v in earlier.get("sums", {}).items()}
        self.steps, self.images = earlier.get("steps", 0), earlier.get("images", 0)
        self.start = time.perf_counter() - earlier.get("seconds", 0.0)

    def add(self, parts: dict[str, Tensor], images: int) -> None:
        self.steps, self.images = self.steps + 1, self.images + images
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.float()

    def partial(self) -> dict[str, Any]:
        """What this part of the epoch measured, in plain values (for the saved state)."""
        return {"sums": {k: v.item() for k, v in self.sums.items()}, "steps": self.steps,
                "images": self.images, "seconds": time.perf_counter() - self.start}

    def metrics(self, world: World) -> dict[str, float]:
        """loss_<part> (mean per step), images, images_per_s and epoch_time_s, over every
        process (one all-reduce)."""
        elapsed = time.perf_counter() - self.start
        names = sorted(self.sums)
        counts = [float(max(self.steps, 1)), float(self.images)]
        reduced = all_reduce_sum(torch.stack(
            [self.sums[n] for n in names] + [torch.tensor(c, device=self.device)
                                             for c in counts]), world)
        steps, images = reduced[-2].item(), reduced[-1].item()
        metrics = {f"loss_{n}": reduced[i].item() / steps for i, n in enumerate(names)}
        return metrics | {"images": int(images), "images_per_s": images / elapsed,
                          "epoch_time_s": elapsed}

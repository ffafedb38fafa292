"""One epoch's training metrics: loss parts summed on the device (no sync per step), steps,
images and time; carried across a mid-epoch stop (`partial()`, saved with the training
state) and summed over the processes at the end (`metrics()`). `LossWatch`, which stops
a run whose loss is no longer finite, checking a window of steps at a time; and `StepBar`,
the epoch's progress bar."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from fastibd.distributed import World, all_reduce_sum
from fastibd.errors import UserError


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

    def partial(self, world: World) -> dict[str, Any]:
        """What this part of the epoch measured on every rank (one all-reduce, which every
        rank joins), in plain values, for the saved state."""
        names = sorted(self.sums)
        reduced = all_reduce_sum(torch.stack(
            [self.sums[n].float() for n in names]
            + [torch.tensor(float(c), device=self.device) for c in (self.steps, self.images)]),
            world).tolist()
        return {"sums": dict(zip(names, reduced[:-2], strict=True)), "steps": int(reduced[-2]),
                "images": int(reduced[-1]), "seconds": time.perf_counter() - self.start}

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


class LossWatch:
    """Raises a UserError naming the step where the loss stopped being finite. The losses
    are kept on the device and checked `every` steps (each check syncs a GPU). Under DDP
    every rank checks at the same steps and they agree (one all-reduce): a rank that
    stopped alone would leave the others waiting in their next all-reduce."""

    def __init__(self, device: torch.device, hint: str, world: World | None = None) -> None:
        self.every = 1 if device.type == "cpu" else 25
        self.hint = hint  # what the user can change, after "Lower optim.lr"
        self.world = world or World()
        self.window: list[tuple[int, Tensor]] = []

    def add(self, index: int, total: Tensor, epoch: int) -> None:
        self.window.append((index, total))
        if len(self.window) >= self.every:
            self.check(epoch)

    def just_checked(self) -> bool:
        """Whether the last `add` checked (and so synced the device): the same steps on
        every rank."""
        return not self.window

    def check(self, epoch: int) -> None:
        window, self.window = self.window, []
        if not window:
            return
        finite = torch.isfinite(torch.stack([t for _, t in window])).all()
        bad_here = ~finite
        if self.world.distributed:
            bad_anywhere = bool(all_reduce_sum(bad_here.float().view(1), self.world).item())
            if bad_anywhere and not bad_here:
                raise UserError(f"the loss became non-finite on another process during epoch "
                                f"{epoch + 1}; stopped without saving {self.hint}")
        if finite:
            return
        index, value = next((i, t.item()) for i, t in window if not torch.isfinite(t))
        raise UserError(f"the loss became {value} at epoch {epoch + 1}, step {index + 1}; "
                        f"stopped without saving {self.hint}")


class StepBar:
    """The epoch's tqdm bar (`show`: the main process with logging.progress), with the loss
    and learning rate every 10 steps (reading the loss syncs a GPU, so not every step)."""

    def __init__(self, steps: int, done: int, epoch: int, epochs: int, show: bool) -> None:
        self.show = show
        self.bar = tqdm(total=steps, initial=done, unit="step", leave=False,
                        desc=f"epoch {epoch + 1}/{epochs}", disable=not show)

    def update(self, index: int, total: Tensor, lr: float) -> None:
        self.bar.update(1)
        if index % 10 == 0 and self.show:
            self.bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.4g}")

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

"""Everything a run needs to continue where it stopped, saved atomically as last.pt: the
student and feature head, optimizer, schedule, scaler, the attack's random generator, the
position (epoch, step in it), the best held-out result so far and the resolved settings.

The dict holds tensors and plain values only, so `torch.load(weights_only=True)` reads it;
its model part is a fastibd model checkpoint (fastibd.models.checkpoint), so fastibd.evaluate
and load_teacher read last.pt too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastibd.errors import UserError
from fastibd.method.step import TrainingStep
from fastibd.models.checkpoint import atomic_save, model_checkpoint


@dataclass
class TrainState:
    """A training step's state and the run's position."""

    step: TrainingStep
    settings: dict[str, dict[str, Any]]  # the resolved settings (Settings.as_dict())
    world_size: int = 1
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # steps of the next epoch already taken (a mid-epoch save)
    best: dict[str, Any] | None = None  # {"epoch": ..., "clean_acc": ..., "pgd_acc": ...}

    def state_dict(self) -> dict[str, Any]:
        step = self.step
        rng = {"torch": torch.get_rng_state()}
        if step.attack_rng is not None:
            rng["attack"] = step.attack_rng.get_state()
        device = next(step.objective.parameters()).device
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        features = step.objective.features
        return model_checkpoint(
            step.student, features=None if features is None else features.state_dict(),
            optimizer=step.optimizer.state_dict(),
            scheduler=None if step.scheduler is None else step.scheduler.state_dict(),
            scaler=step.scaler.state_dict(), epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            rng=rng, best=self.best, config=self.settings, world_size=self.world_size)

    def check_finite(self, where: str, last: Path) -> None:
        """A finite loss can still be followed by an update (or BN statistics) gone to inf:
        such a state must never be saved."""
        values = [t for t in self.step.objective.state_dict().values() if t.is_floating_point()]
        if not torch.stack([t.isfinite().all() for t in values]).all():
            raise UserError(f"the weights became non-finite {where}; stopped without saving "
                            f"(the last checkpoint is from before: {last}). Lower optim.lr")

    def save(self, path: Path) -> None:
        atomic_save(self.state_dict(), path)

    def load(self, path: Path) -> None:
        """Continue from `path`, which must be a run of the same architecture and mode."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged file must not become a traceback
            raise UserError(f"cannot resume from {path} ({str(err).splitlines()[0]}); move it "
                            "away to start over") from None
        step = self.step
        arch, mode = step.student.spec.arch, step.loss.mode
        saved_arch = state.get("spec", {}).get("arch")
        saved_mode = state["config"]["loss"]["mode"]
        if saved_arch != arch or saved_mode != mode:
            raise UserError(f"{path} is a {saved_arch} run in mode {saved_mode}; this config "
                            f"trains a {arch} in mode {mode}: use another training.out_dir")
        step.student.load_state_dict(state["model"])
        if step.objective.features is not None:
            step.objective.features.load_state_dict(state["features"])
        step.optimizer.load_state_dict(state["optimizer"])
        if step.scheduler is not None:
            step.scheduler.load_state_dict(state["scheduler"])
        step.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.best = (state["epoch"], state["step_in_epoch"],
                                                     state["best"])
        torch.set_rng_state(state["rng"]["torch"])
        if step.attack_rng is not None and "attack" in state["rng"]:
            step.attack_rng.set_state(state["rng"]["attack"])
        device = next(step.objective.parameters()).device
        if "cuda" in state["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)

"""Everything a run needs to continue where it stopped, saved atomically as last.pt: the
student and feature head, optimizer, schedule, scaler, the attack's random generator, the
position (epoch, step in it), the best held-out result so far and the resolved settings.

The dict holds tensors and plain values only, so `torch.load(weights_only=True)` reads it;
its model part is a fastibd model checkpoint (fastibd.models.checkpoint), so fastibd.evaluate
and load_teacher read last.pt too.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastibd.distributed import World, gather_objects
from fastibd.errors import UserError
from fastibd.method.step import TrainingStep
from fastibd.models.checkpoint import atomic_save, model_checkpoint


def position(epoch: int, step_in_epoch: int) -> str:
    """Where a run stands, as the stop and resume messages say it (epochs counted from 1)."""
    if step_in_epoch:
        return f"at epoch {epoch + 1}, step {step_in_epoch}"
    return f"after epoch {epoch}" if epoch else "before the first step"


@dataclass
class TrainState:
    """A training step's state and the run's position."""

    step: TrainingStep
    settings: dict[str, dict[str, Any]]  # the resolved settings (Settings.as_dict())
    world_size: int = 1
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # steps of the next epoch already taken (a mid-epoch save)
    best: dict[str, Any] | None = None  # {"epoch": ..., "clean_acc": ..., "pgd_acc": ...}
    # the epoch in progress at a mid-epoch save: its loss sums, steps and images (summed
    # over the ranks) and seconds, so the epoch's metrics still cover all of it after a resume
    partial: dict[str, Any] | None = field(default=None)

    def state_dict(self, world: World | None = None) -> dict[str, Any]:
        step, world = self.step, world or World()
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
            rng=rng, rng_ranks=gather_objects(rng, world),
            # each rank's BatchNorm statistics: DDP syncs them at the training forward only,
            # and the eval-mode attack of the next step reads the rank's own
            buffers_ranks=gather_objects({name: value.cpu() for name, value
                                          in step.student.named_buffers()}, world),
            best=self.best,
            config=self.settings, world_size=self.world_size,
            partial=self.partial)

    def keep_if_best(self, held: dict[str, Any], path: Path) -> bool:
        """Record `held` (this epoch's held-out clean/PGD accuracy) and save the student to
        `path` when its PGD accuracy beats the best so far."""
        if self.best is not None and held["pgd_acc"] <= self.best["pgd_acc"]:
            return False
        self.best = {"epoch": self.epoch, **held}
        atomic_save(model_checkpoint(self.step.student, epoch=self.epoch, holdout=held), path)
        return True

    def check_finite(self, last: Path) -> None:
        """A finite loss can still be followed by an update (or BN statistics) gone to inf:
        such a state must never be saved."""
        where = (f"by the end of epoch {self.epoch}" if self.step_in_epoch == 0 else
                 f"at epoch {self.epoch + 1}, step {self.step_in_epoch}")
        values = [t for t in self.step.objective.state_dict().values() if t.is_floating_point()]
        if not torch.stack([t.isfinite().all() for t in values]).all():
            raise UserError(f"the weights became non-finite {where}; stopped without saving "
                            f"(the last checkpoint is from before: {last}). Lower optim.lr")

    def save(self, path: Path, world: World) -> None:
        """last.pt. Every rank calls it (it gathers their RNG states); rank 0 writes it."""
        checkpoint = self.state_dict(world)
        if world.is_main:
            atomic_save(checkpoint, path)

    def load(self, path: Path, allow_changes: bool = False, world: World | None = None
             ) -> dict[str, tuple[Any, Any]]:
        """Continue from `path`. It must be a training state of the same architecture and
        mode, trained with the same settings except those a resume may change
        (RESUMABLE_CHANGES); other differences are refused unless `allow_changes`. Returns
        every setting that differs, {key: (saved, now)}."""
        state = read_training_state(path)
        step = self.step
        arch, mode = step.student.spec.arch, step.loss.mode
        saved_arch, saved_mode = state["spec"].get("arch"), state["config"]["loss"]["mode"]
        if saved_arch != arch or saved_mode != mode:
            raise UserError(f"{path} is a {saved_arch} run in mode {saved_mode}; this config "
                            f"trains a {arch} in mode {mode}: use another training.out_dir")
        changes = setting_changes(state["config"], self.settings)
        refused = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES
                   or (k == "training.epochs"
                       and self.settings["optim"]["schedule"] in SCHEDULES_OVER_EPOCHS)}
        if refused and not allow_changes:
            listed = "; ".join(f"{k} {_shown(old)} -> {_shown(new)}"
                               for k, (old, new) in refused.items())
            raise UserError(f"{path.parent} was trained with other settings ({listed}): resume "
                            "with the run's own settings, choose another training.out_dir, or "
                            "pass --training.resume_changed=true to continue with these")
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise UserError(f"{path} was trained by {saved_world} process(es), this run has "
                            f"{self.world_size}: the steps per epoch, each process's data and "
                            f"the schedule's position depend on it; resume with "
                            f"training.nproc={saved_world}")
        step.student.load_state_dict(state["model"])
        rank = world.rank if world is not None else 0
        if state.get("buffers_ranks"):
            step.student.load_state_dict(state["buffers_ranks"][rank], strict=False)
        if step.objective.features is not None:
            step.objective.features.load_state_dict(state["features"])
        current = [dict(g) for g in step.optimizer.param_groups]  # this run's settings
        try:
            step.optimizer.load_state_dict(state["optimizer"])
        except ValueError:  # other parameter groups, e.g. optim.decay_norm_and_bias changed
            raise UserError(f"{path}'s optimizer state does not fit this run's parameter groups "
                            "(optim.decay_norm_and_bias cannot change on resume): choose "
                            "another training.out_dir") from None
        for group, now in zip(step.optimizer.param_groups, current, strict=True):
            for key in ("weight_decay", "momentum", "nesterov", "dampening", "initial_lr"):
                if key in now:
                    group[key] = now[key]
        if step.scheduler is not None:
            step.scheduler.load_state_dict(state["scheduler"])
            sched = step.scheduler  # its position from the file, its rates from the settings
            sched.base_lrs = [g["initial_lr"] for g in step.optimizer.param_groups]
            for group, base, factor in zip(step.optimizer.param_groups, sched.base_lrs,
                                           sched.lr_lambdas, strict=True):
                group["lr"] = base * factor(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in step.optimizer.param_groups]
        step.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.best = (state["epoch"], state["step_in_epoch"],
                                                     state["best"])
        self.partial = state.get("partial")
        # each rank's own random streams (the same world size, checked above); files saved
        # before rng_ranks existed hold rank 0's only
        rng = (state.get("rng_ranks") or [state["rng"]] * self.world_size)[rank]
        torch.set_rng_state(rng["torch"])
        if step.attack_rng is not None and "attack" in rng:
            step.attack_rng.set_state(rng["attack"])
        device = next(step.objective.parameters()).device
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        return changes

    def size_estimate(self) -> int:
        """Bytes of one checkpoint of this state, about: the weights, the optimizer's
        momentum and the features head, twice over for safety margin."""
        tensors = [*self.step.objective.parameters(), *self.step.objective.buffers()]
        return 2 * 2 * sum(t.numel() * t.element_size() for t in tensors)


# A resume may change these (they do not change what the run computes): more epochs, how
# the data is read, what is printed, how often the held-out slice is scored, where to run.
# Not more epochs for the schedules that spread over all of them: the lr would jump.
RESUMABLE_CHANGES = frozenset({
    "training.epochs", "training.eval_every", "training.out_dir", "training.resume",
    "training.resume_changed", "training.nproc", "data.num_workers", "data.os_cache",
    "logging.progress", "logging.tensorboard", "teacher.source",
})
SCHEDULES_OVER_EPOCHS = ("onecycle", "linear")
TRAINING_KEYS = ("format", "spec", "model", "optimizer", "scaler", "epoch", "step_in_epoch",
                 "rng", "best", "config")


def read_training_state(path: Path) -> dict[str, Any]:
    """A last.pt checked to be a fastibd training state; anything else is one line that
    says what the file is."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a pickle of objects: damaged or not PyTorch's
            raise UserError(f"cannot resume from {path}: it is truncated or not a PyTorch "
                            "file; move it away to start over") from None
        raise UserError(f"{path} is a full pickle, not a training state fastibd writes; move "
                        "it away to start over") from None
    except Exception:  # noqa: BLE001 - a damaged file must not become a traceback
        raise UserError(f"cannot resume from {path}: it is truncated or not a PyTorch file; "
                        "move it away to start over") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a fastibd training state; "
                        "move it away to start over")
    if state.get("format") != "fastibd":
        raise UserError(f"{path} is not a fastibd checkpoint (no fastibd format marker); move "
                        "it away to start over")
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        kind = "a model checkpoint (like best.pt)" if "model" in state else "incomplete"
        raise UserError(f"{path} is {kind}, not a training state: it has no "
                        f"{', '.join(missing)}; move it away to start over")
    return state


def setting_changes(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]
                    ) -> dict[str, tuple[Any, Any]]:
    """{"section.key": (saved value, current value)} for every setting that differs (a key
    one side lacks counts, as <absent>)."""
    flat_saved, flat_now = _flat(saved), _flat(now)
    absent = "<absent>"
    return {key: (flat_saved.get(key, absent), flat_now.get(key, absent))
            for key in sorted(flat_saved.keys() | flat_now.keys())
            if flat_saved.get(key, absent) != flat_now.get(key, absent)}


def _flat(tree: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{name}.{key}": list(value) if isinstance(value, tuple) else value
            for name, values in tree.items() for key, value in values.items()}


def _shown(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)

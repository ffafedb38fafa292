"""Train a robust student from a run's Settings: `Trainer(settings).fit()`.

One readable loop (after ffcv-imagenet's train_imagenet.py): data, models and the training
step are built from their own settings sections by their own modules; the loop runs the
epochs, keeps the metrics, picks the best checkpoint and saves the state. The run directory
(fastibd.run_dir) holds config.yaml, metrics.jsonl, last.pt (every epoch and on Ctrl-C /
SIGTERM) and best.pt (highest PGD accuracy on images held out of the *training* set: the
test set never picks a checkpoint). Building a Trainer on a run directory with a last.pt
resumes that run.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from typing import Any

import torch
from tqdm import tqdm

from fastibd.data import training_data
from fastibd.device import device_name, resolve_runtime
from fastibd.distributed import barrier, init_world
from fastibd.errors import UserError
from fastibd.eval.robustness import clean_and_pgd
from fastibd.method.modes import MODES
from fastibd.method.step import build_step
from fastibd.models import build_student
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.models.teachers import check_teacher_accuracy, run_teacher
from fastibd.run_dir import BEST, LAST, RunDirectory, RunLog
from fastibd.train.meter import EpochMeter
from fastibd.train.schedule import build_optimizer, build_scheduler
from fastibd.train.settings import Settings
from fastibd.train.state import TrainState

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Trainer:
    """Builds everything from the settings (failing early on bad input), then fits."""

    def __init__(self, settings: Settings) -> None:
        s = self.settings = settings
        runtime = resolve_runtime(s.training.device, s.training.precision, s.training.compile,
                                  s.training.compile_mode)
        self.world = world = init_world(runtime.device.type)
        if runtime.device.type == "cuda":
            runtime = replace(runtime, device=torch.device("cuda", world.local_rank))
        if world.distributed and world.is_main:
            print(f"distributed: {world.size} process{'es' * (world.size > 1)}, backend "
                  f"{torch.distributed.get_backend()}", flush=True)
        self.runtime = runtime
        # The run directory first, before any data is read or model built: a bad or busy
        # location fails in a second, not after minutes of loading.
        self.run = RunDirectory(s.training.out_dir)
        self.run_dir = self.run.path
        self.log: RunLog | None = None
        if world.is_main:
            self.run.lock()
        try:
            self._build(s, runtime)
        except BaseException:
            self.close(failed=True)
            raise

    def _build(self, s: Settings, runtime) -> None:
        world = self.world
        last = self.run_dir / LAST
        if last.exists() and not s.training.resume:
            raise UserError(f"{self.run_dir} already holds a run ({last}); choose another "
                            "training.out_dir, or resume it with training.resume=true")
        if world.is_main:
            self.run.remove_temporaries()  # of writes a killed run left half done
        torch.manual_seed(s.training.seed + world.rank)
        self.data = training_data(s.data, runtime.device, s.training.seed, world.distributed)
        classes, place = self.data.num_classes, dict(device=runtime.device,
                                                     memory_format=runtime.memory_format)
        student = build_student(s.model, classes, self.data.eval_size).to(**place)
        teacher = None
        if MODES[s.loss.mode].teacher:
            teacher = run_teacher(s.teacher, s.loss.mode, classes).to(**place)
            if self.data.holdout is not None:
                check_teacher_accuracy(teacher, self.data.holdout,
                                       ("none", s.model.normalization), classes, s.teacher.path,
                                       name=s.teacher.name)
        self.steps_per_epoch = len(self.data.train)
        if s.training.max_steps:
            self.steps_per_epoch = min(self.steps_per_epoch, s.training.max_steps)
        if self.steps_per_epoch == 0:
            raise UserError(f"{s.data.train_path} has fewer training images than one batch "
                            f"of {s.data.batch_size} per process")
        # Its own checkpointed generator: the attack noise resumes exactly.
        attack_rng = torch.Generator(runtime.device).manual_seed(
            s.training.seed * 1000 + 2 + world.rank)
        self.step = build_step(
            student, teacher, s.loss, s.attack, runtime, resolution=self.data.input_size,
            make_optimizer=lambda module: build_optimizer(module, s.optim, world.size),
            make_scheduler=lambda optimizer: build_scheduler(
                optimizer, s.optim, s.training.epochs, self.steps_per_epoch),
            attack_rng=attack_rng, ddp=world.distributed,
            device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            awp=s.awp)
        self.state = TrainState(self.step, s.as_dict(), world.size)
        self.stop_signal: int | None = None
        if world.is_main:
            self.run.check_free_space(self.state.size_estimate())
        changes = {}
        if last.exists():
            changes = self.state.load(last, s.training.resume_changed)
            print(f"resuming {last}: epoch {self.state.epoch}, step {self.state.step_in_epoch}",
                  flush=True)
        if world.is_main:
            self.run.write_config(self.state.settings)  # once, when the run starts
            self.log = RunLog(self.run_dir, s.logging.tensorboard)
            if changes:
                self.run.record_changes(changes, self.state.epoch, self.state.step_in_epoch)
                self.log.write({"kind": "resume", "epoch": self.state.epoch,
                                "step_in_epoch": self.state.step_in_epoch,
                                "changes": {k: [old, new] for k, (old, new) in
                                            changes.items()}})
        barrier(world)

    def close(self, failed: bool = False) -> None:
        """Release the run directory (fit does; call it for a Trainer that never fits)."""
        if self.log is not None:
            self.log.close()
            self.log = None
        self.run.unlock(failed)

    # ------------------------------------------------------------------ the loop

    def train_epoch(self) -> dict[str, float]:
        state, device = self.state, self.runtime.device
        self.data.train.set_epoch(state.epoch)  # its order, crops and resolution
        if self.step.awp is not None:
            self.step.awp.set_epoch(state.epoch)  # on after awp.warmup epochs
        skip, state.step_in_epoch = state.step_in_epoch, 0
        # Resuming mid-epoch: the metrics carry on from what the stopped part measured (under
        # DDP rank 0's share of that part).
        meter = EpochMeter(device, state.partial if skip and self.world.is_main else None)
        window: list[tuple[int, torch.Tensor]] = []
        check_every = 1 if device.type == "cpu" else 25  # each check syncs the GPU
        resolution = None
        show = self.settings.logging.progress and self.world.is_main
        bar = tqdm(total=self.steps_per_epoch, initial=skip, unit="step", leave=False,
                   desc=f"epoch {state.epoch + 1}/{self.settings.training.epochs}",
                   disable=not show)
        for index, (x, y) in enumerate(self.data.train):
            if index >= self.steps_per_epoch:
                break
            if index < skip:  # resuming mid-epoch: same order, so skip what was trained
                continue
            total, parts = self.step(x.contiguous(memory_format=self.runtime.memory_format), y)
            resolution, state.step_in_epoch = x.shape[-1], index + 1
            meter.add(parts, len(y))
            window.append((index, total))
            if len(window) >= check_every:
                self._check_finite(window)
                window = []
            bar.update(1)
            if index % 10 == 0 and show:
                bar.set_postfix(loss=f"{total.item():.4f}",
                                lr=f"{self.step.scheduler.get_last_lr()[0]:.4g}")
            if self.stop_signal is not None:
                self._check_finite(window)
                state.partial = meter.partial()
                self._save_state()
                bar.close()
                raise _Stopped(self.stop_signal)
        self._check_finite(window)
        bar.close()
        state.partial = None
        metrics = meter.metrics(self.world)
        if resolution is not None:
            metrics["resolution"] = resolution  # as trained (progressive resizing)
        return metrics

    def _check_finite(self, window: list[tuple[int, torch.Tensor]]) -> None:
        if not window or torch.isfinite(torch.stack([t for _, t in window])).all():
            return
        index, value = next((i, t.item()) for i, t in window if not torch.isfinite(t))
        hint = "" if self.runtime.dtype == torch.float32 else \
            ", or train in fp32 (training.precision)"
        raise UserError(f"the loss became {value} at epoch {self.state.epoch + 1}, step "
                        f"{index + 1}; stopped without saving (the last checkpoint is from "
                        f"before: {self.run_dir / LAST}). Lower optim.lr{hint}")

    def _check_weights(self) -> None:
        state = self.state
        where = (f"by the end of epoch {state.epoch}" if state.step_in_epoch == 0 else
                 f"at epoch {state.epoch + 1}, step {state.step_in_epoch}")
        state.check_finite(where, self.run_dir / LAST)

    def _save_state(self) -> None:
        self._check_weights()
        if self.world.is_main:
            self.state.save(self.run_dir / LAST)

    def evaluate(self, loader) -> dict[str, Any]:
        """Clean and PGD accuracy of the student: the PGD of `fastibd.evaluate`, at the run's
        eps, with attack.eval_steps steps of attack.eval_step_size (default eps/4)."""
        attack = self.settings.attack
        return clean_and_pgd(self.step.student, loader, attack.eps,
                             attack.eval_step_size or attack.eps / 4, attack.eval_steps,
                             self.settings.training.seed, self.data.num_classes,
                             norm=attack.norm)

    def fit(self) -> int:
        training, state = self.settings.training, self.state
        previous = {sig: signal.signal(sig, self._request_stop) for sig in SIGNAL_EXIT}
        try:
            while state.epoch < training.epochs:
                metrics = self.train_epoch()
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
                record = {"kind": "epoch", "epoch": state.epoch,
                          "lr": self.step.scheduler.get_last_lr()[0], **metrics,
                          "device": device_name(self.runtime.device),
                          "processes": self.world.size}
                self._check_weights()
                due = state.epoch % training.eval_every == 0 or state.epoch == training.epochs
                if self.data.holdout is not None and due:
                    if self.world.is_main:
                        held = self.evaluate(self.data.holdout)
                        record |= {f"holdout_{k}": v for k, v in held.items()}
                        if state.best is None or held["pgd_acc"] > state.best["pgd_acc"]:
                            state.best = {"epoch": state.epoch, **held}
                            atomic_save(model_checkpoint(self.step.student, epoch=state.epoch,
                                                         holdout=held), self.run_dir / BEST)
                    barrier(self.world)
                self._save_state()
                if self.log is not None:
                    self.log.write(record)
                    print(_summary(record), flush=True)
            if self.world.is_main:
                self._final_report()
            return 0
        except _Stopped as stopped:
            if self.world.is_main:
                print(f"stopped by {signal.Signals(stopped.signum).name} at epoch "
                      f"{state.epoch + 1}, step {state.step_in_epoch}; saved "
                      f"{self.run_dir / LAST}. Run the same command to resume.", file=sys.stderr)
            return SIGNAL_EXIT[stopped.signum]
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()

    def _request_stop(self, signum: int, _frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum

    def _final_report(self) -> None:
        """Validation accuracy of the best checkpoint (or the last, without a held-out slice)."""
        chosen = "last"
        if (self.run_dir / BEST).exists():
            best = torch.load(self.run_dir / BEST, map_location="cpu", weights_only=True)
            self.step.student.load_state_dict(best["model"])
            chosen = f"best (epoch {best['epoch']})"
        val = self.evaluate(self.data.val)
        record = {"kind": "final", "epoch": self.state.epoch, "checkpoint": chosen,
                  **{f"val_{k}": v for k, v in val.items()}}
        if self.log is not None:
            self.log.write(record)
        print(f"final {chosen}: val clean {val['clean_acc']:.2%}, {val['attack']}: "
              f"{val['pgd_acc']:.2%} on {val['eval_images']} images", flush=True)


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        self.signum = signum


def _summary(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}"]
    parts += [f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss_")]
    if "holdout_clean_acc" in record:
        parts += [f"held-out clean {record['holdout_clean_acc']:.2%}",
                  f"PGD {record['holdout_pgd_acc']:.2%}"]
    parts += [f"lr {record['lr']:.4g}", f"{record['images_per_s']:.0f} img/s"]
    return "  ".join(parts)

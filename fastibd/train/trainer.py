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

import sys
from typing import Any

import torch

from fastibd.data import training_data
from fastibd.device import device_name, resolve_runtime
from fastibd.distributed import agreed_signal, barrier, join
from fastibd.errors import UserError
from fastibd.eval.robustness import clean_and_pgd
from fastibd.method.modes import MODES
from fastibd.method.step import build_step
from fastibd.models import build_student
from fastibd.models.teachers import check_teacher_accuracy, run_teacher
from fastibd.run_dir import BEST, LAST, RunDirectory, epoch_line
from fastibd.train.meter import EpochMeter, LossWatch, StepBar
from fastibd.train.schedule import build_optimizer, build_scheduler
from fastibd.train.settings import Settings
from fastibd.train.state import TrainState, position
from fastibd.train.stopping import EXIT_CODES, Stopped, StopRequests


class Trainer:
    """Builds everything from the settings (failing early on bad input), then fits."""

    def __init__(self, settings: Settings) -> None:
        s = self.settings = settings
        self.runtime, self.world = runtime, world = join(resolve_runtime(
            s.training.device, s.training.precision, s.training.compile,
            s.training.compile_mode))
        # The run directory first, before any data is read or model built: a bad or busy
        # location fails in a second, not after minutes of loading.
        self.run = RunDirectory(s.training.out_dir)
        self.run_dir, self.log, self.stops = self.run.path, None, StopRequests()
        if world.is_main:
            self.run.lock()
        # Ctrl-C is a stop request from here on (see fastibd.train.stopping); close() ends it
        self.stops.start()
        try:
            self._build(s, runtime)
        except BaseException:
            self.close(failed=True)
            raise

    def _build(self, s: Settings, runtime) -> None:
        world = self.world
        last = self.run.resumable(s.training.resume, tidy=world.is_main)
        torch.manual_seed(s.training.seed + world.rank)
        self.data = training_data(s.data, runtime.device, s.training.seed, world.distributed)
        classes, place = self.data.num_classes, dict(device=runtime.device,
                                                     memory_format=runtime.memory_format)
        crop_ratio = s.data.val_crop_ratio if s.data.pipeline == "imagenet" else None
        student = build_student(s.model, classes, self.data.eval_size, crop_ratio).to(**place)
        teacher = None
        if MODES[s.loss.mode].teacher:
            teacher = run_teacher(s.teacher, s.loss.mode, classes).to(**place)
            if self.data.holdout is not None:
                check_teacher_accuracy(teacher, self.data.holdout,
                                       ("none", s.model.normalization), classes, s.teacher.path,
                                       name=s.teacher.name)
        steps = len(self.data.train)
        self.steps_per_epoch = min(steps, s.training.max_steps or steps)
        if self.steps_per_epoch == 0:  # after the teacher: its error says more
            raise UserError(f"{s.data.train_path} has fewer training images than one batch "
                            f"of {s.data.batch_size} per process")
        self.step = build_step(
            student, teacher, s.loss, s.attack, runtime, resolution=self.data.input_size,
            make_optimizer=lambda module: build_optimizer(module, s.optim, world.size),
            make_scheduler=lambda optimizer: build_scheduler(
                optimizer, s.optim, s.training.epochs, self.steps_per_epoch),
            # its own checkpointed generator: the attack noise resumes exactly
            attack_rng=torch.Generator(runtime.device).manual_seed(
                s.training.seed * 1000 + 2 + world.rank),
            ddp=world.distributed, awp=s.awp)
        self.state = state = TrainState(self.step, s.as_dict(), world.size)
        changes = state.load(last, s.training.resume_changed, world) if last else {}
        if last:
            print(f"resuming {last} {position(state.epoch, state.step_in_epoch)}", flush=True)
        if world.is_main:
            self.run.check_free_space(state.size_estimate())
            self.log = self.run.begin(state.settings, changes, state.epoch,
                                      state.step_in_epoch, s.logging.tensorboard)
        barrier(world)

    def close(self, failed: bool = False) -> None:
        """Release the run directory (fit does; call it for a Trainer that never fits)."""
        if self.log is not None:
            self.log.close()
            self.log = None
        self.stops.end()
        self.run.unlock(failed)

    # ------------------------------------------------------------------ the loop

    def train_epoch(self) -> dict[str, float]:
        state, device = self.state, self.runtime.device
        self.data.train.set_epoch(state.epoch)  # its order, crops and resolution
        if self.step.awp is not None:
            self.step.awp.set_epoch(state.epoch)  # on after awp.warmup epochs
        skip, state.step_in_epoch, resolution = state.step_in_epoch, 0, None
        # Resuming mid-epoch: the metrics carry on from what the stopped part measured (summed
        # over the ranks that measured it; rank 0 carries it, the others start from zero).
        meter = EpochMeter(device, state.partial if skip and self.world.is_main else None)
        fp32 = ("" if self.runtime.dtype == torch.float32 else
                ", or train in fp32 (training.precision)")
        watch = LossWatch(device, f"(the last checkpoint is from before: {self.run_dir / LAST})."
                          f" Lower optim.lr{fp32}", self.world)
        bar = StepBar(self.steps_per_epoch, skip, state.epoch, self.settings.training.epochs,
                      self.settings.logging.progress and self.world.is_main)
        with bar:
            for index, (x, y) in enumerate(self.data.train):
                if index >= self.steps_per_epoch:
                    break
                if index < skip:  # resuming mid-epoch: same order, so skip what was trained
                    continue
                total, parts = self.step(x.contiguous(memory_format=self.runtime.memory_format),
                                         y)
                resolution, state.step_in_epoch = x.shape[-1], index + 1
                meter.add(parts, len(y))
                watch.add(index, total, state.epoch)
                bar.update(index, total, self.step.scheduler.get_last_lr()[0])
                # Under DDP the ranks agree on a stop at the steps where the loss check has
                # just synced the device anyway (every step on a CPU, every 25 on a GPU): one
                # all-reduce, no sync of its own. Alone, a process stops after any step.
                due = watch.just_checked() or not self.world.distributed
                signum = agreed_signal(self.stops.signum, self.world, device) if due else None
                if signum is not None:
                    watch.check(state.epoch)
                    state.partial = meter.partial(self.world)
                    self._save_state(check=True)
                    raise Stopped(signum)
            watch.check(state.epoch)
        state.partial = None
        metrics = meter.metrics(self.world)
        if resolution is not None:
            metrics["resolution"] = resolution  # as trained (progressive resizing)
        return metrics

    def _save_state(self, check: bool) -> None:
        """last.pt; `check`: first refuse a state gone non-finite (see TrainState)."""
        if check:
            self.state.check_finite(self.run_dir / LAST)
        self.state.save(self.run_dir / LAST, self.world)

    def evaluate(self, loader) -> dict[str, Any]:
        """Clean and PGD accuracy of the student: the PGD of `fastibd.evaluate`, at the run's
        eps, with attack.eval_steps steps of attack.eval_step_size (default eps/4)."""
        attack = self.settings.attack
        return clean_and_pgd(self.step.student, loader, attack.eps,
                             attack.eval_step_size or attack.eps / 4, attack.eval_steps,
                             self.settings.training.seed, self.data.num_classes,
                             norm=attack.norm, progress=self.settings.logging.progress)

    def fit(self) -> int:
        training, state = self.settings.training, self.state
        try:
            self._stop_if_asked()  # during the setup
            while state.epoch < training.epochs:
                metrics = self.train_epoch()
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
                record = {"kind": "epoch", "epoch": state.epoch,
                          "lr": self.step.scheduler.get_last_lr()[0], **metrics,
                          "device": device_name(self.runtime.device),
                          "processes": self.world.size}
                state.check_finite(self.run_dir / LAST)  # before best.pt may be saved
                due = state.epoch % training.eval_every == 0 or state.epoch == training.epochs
                if self.data.holdout is not None and due:
                    if self.world.is_main:
                        held = self.evaluate(self.data.holdout)
                        record |= {f"holdout_{k}": v for k, v in held.items()}
                        state.keep_if_best(held, self.run_dir / BEST)
                    barrier(self.world)
                self._save_state(check=False)
                if self.log is not None:
                    self.log.write(record)
                    print(epoch_line(record), flush=True)
                self._stop_if_asked()  # during the held-out evaluation or the save
            # Training is saved: from here Ctrl-C ends the final validation at once (the
            # run's command, run again, repeats only the validation).
            self.stops.end()
            if self.world.is_main:
                self._final_report()
            return 0
        except Stopped as stopped:
            if self.world.is_main:
                saved = (f"; saved {self.run_dir / LAST}. Run the same command to resume"
                         if (self.run_dir / LAST).exists() else "; nothing was trained")
                print(f"stopped by {stopped} {position(state.epoch, state.step_in_epoch)}"
                      f"{saved}.", file=sys.stderr)
            return EXIT_CODES[stopped.signum]
        finally:
            self.close()

    def _stop_if_asked(self) -> None:
        """Stopped, when a stop was asked for outside a training step (its state is saved);
        every rank stops, or none does."""
        signum = agreed_signal(self.stops.signum, self.world, self.runtime.device)
        if signum is not None:
            raise Stopped(signum)

    def _final_report(self) -> None:
        """Validation accuracy of the best checkpoint (or the last, without a held-out slice)."""
        chosen = "last"
        if (self.run_dir / BEST).exists():
            best = torch.load(self.run_dir / BEST, map_location="cpu", weights_only=True)
            self.step.student.load_state_dict(best["model"])
            chosen = f"best (epoch {best['epoch']})"
        val = self.evaluate(self.data.val)
        if self.log is not None:
            self.log.write({"kind": "final", "epoch": self.state.epoch, "checkpoint": chosen,
                            **{f"val_{k}": v for k, v in val.items()}})
        print(f"final {chosen}: val clean {val['clean_acc']:.2%}, {val['attack']}: "
              f"{val['pgd_acc']:.2%} on {val['eval_images']} images", flush=True)

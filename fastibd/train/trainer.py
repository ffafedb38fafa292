"""Train a robust student: `python -m fastibd.train --cfg NAME [--section.key=value ...]`.

One readable loop (after ffcv-imagenet's train_imagenet.py): FFCV data, channels_last,
autocast (bf16 on CUDA), torch.compile on CUDA, DDP under torchrun. The run directory
(training.out_dir) holds config.yaml, metrics.jsonl, last.pt (every epoch and on Ctrl-C /
SIGTERM) and best.pt (highest PGD accuracy on images held out of the *training* set: the
test set never picks a checkpoint). Rerunning the same command resumes the run.

    python -m fastibd.train --cfg smoke
    torchrun --nproc_per_node=8 -m fastibd.train --cfg imagenet_eps4
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fastibd.data import (
    ImageNetTrainLoader,
    LoaderOptions,
    cifar_loader,
    dataset_labels,
    dataset_resolution,
    imagenet_val_loader,
    set_epoch,
)
from fastibd.data.augment import training_batch
from fastibd.device import (
    resolve_compile,
    resolve_device,
    resolve_precision,
    training_memory_format,
)
from fastibd.distributed import all_reduce_sum, barrier, init_world
from fastibd.errors import UserError
from fastibd.method import attacks
from fastibd.method.objective import (
    TEACHER_MODES,
    AttackSettings,
    LossSettings,
    TrainingObjective,
)
from fastibd.method.step import assemble_step, feature_distillation
from fastibd.models import NORMALIZATIONS, TappedModel, build_model
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.models.teachers import load_teacher
from fastibd.run_dir import RunLog
from fastibd.train.schedule import lr_factor, resolution_at

LAST, BEST, CONFIG = "last.pt", "best.pt", "config.yaml"
TEACHER_NORMALIZATION_GAP = 0.15  # accuracy another normalization must add to be "the right one"
HOLDOUT_SEED = 20231  # fixed: the held-out slice must not change when training.seed does
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def namespace(tree: dict[str, dict[str, Any]]) -> SimpleNamespace:
    return SimpleNamespace(**{name: SimpleNamespace(**values) for name, values in tree.items()})


class Trainer:
    """Builds everything from the resolved settings (failing early on bad input), then fits."""

    def __init__(self, settings: dict[str, dict[str, Any]]) -> None:
        self.settings = settings
        cfg = self.cfg = namespace(settings)
        self.device = resolve_device(cfg.training.device, "training.device")
        self.world = init_world(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        if self.world.distributed and self.world.is_main:
            processes = "process" if self.world.size == 1 else "processes"
            print(f"distributed: {self.world.size} {processes}, backend "
                  f"{torch.distributed.get_backend()}", flush=True)
        self.dtype = resolve_precision(cfg.training.precision, self.device)
        self.memory_format = training_memory_format(self.device)
        self.run_dir = Path(cfg.training.out_dir)
        torch.manual_seed(cfg.training.seed + self.world.rank)

        self._check_data()
        options = {"blurpool": True} if cfg.model.blurpool else {}
        self.student = build_model(cfg.model.arch, self.num_classes, cfg.model.normalization,
                                   cfg.model.width_mult, **options).to(
                                       self.device, memory_format=self.memory_format)
        self.teacher = self._load_teacher() if cfg.loss.mode in TEACHER_MODES else None
        self.train_loader, self.holdout_loader, self.val_loader = self._loaders()
        self._check_teacher_accuracy()

        features = None
        if cfg.loss.mode == "ibd" and cfg.loss.beta != 0:
            features = feature_distillation(self.teacher, self.student, self.input_size,
                                            cfg.loss.attention_dim, cfg.loss.backend
                                            ).to(self.device)
        loss = LossSettings(cfg.loss.mode, cfg.loss.alpha, cfg.loss.beta, cfg.loss.temperature,
                            cfg.loss.trades_beta, cfg.loss.rslad_scale)
        self.objective = TrainingObjective(self.student, loss, features)
        self.attack = AttackSettings(cfg.attack.eps, cfg.attack.step_size, cfg.attack.steps,
                                     cfg.attack.start, cfg.attack.fgsm_alpha)

        self.steps_per_epoch = len(self.train_loader)
        if cfg.training.max_steps:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.training.max_steps)
        if self.steps_per_epoch == 0:
            raise UserError(f"{cfg.data.train_path} has fewer training images than one batch "
                            f"of {cfg.data.batch_size} per process")
        self.optimizer = self._optimizer()
        factor = lr_factor(cfg.optim.schedule, cfg.training.epochs, cfg.optim.milestones,
                           cfg.optim.gamma, cfg.optim.peak_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: factor(step / self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        # Separate, checkpointed generators: augmentation and attack noise resume exactly.
        self.augment_rng = torch.Generator(self.device).manual_seed(cfg.training.seed * 1000 + 1
                                                                    + self.world.rank)
        self.attack_rng = torch.Generator(self.device).manual_seed(cfg.training.seed * 1000 + 2
                                                                   + self.world.rank)

        self.compiled = resolve_compile(cfg.training.compile, self.device)
        self.step = assemble_step(
            self.objective, self.teacher, mode=cfg.loss.mode, attack=self.attack,
            temperature=cfg.loss.temperature, optimizer=self.optimizer, scaler=self.scaler,
            scheduler=self.scheduler, dtype=self.dtype, attack_rng=self.attack_rng,
            compiled=self.compiled, compile_mode=cfg.training.compile_mode,
            ddp=self.world.distributed,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            teacher_input=cfg.loss.teacher_input)

        self.epoch, self.step_in_epoch, self.best = 0, 0, None
        self.stop_signal: int | None = None
        self._prepare_run_dir()

    # ------------------------------------------------------------------ building blocks

    @property
    def input_size(self) -> int:
        return self.image_size if self.cfg.data.pipeline == "cifar" else self.cfg.data.min_res

    def train_resolution(self, epoch: int) -> int:
        data = self.cfg.data
        return resolution_at(epoch, data.min_res, data.max_res, data.start_ramp, data.end_ramp,
                             data.res_step)

    def _check_data(self) -> None:
        cfg = self.cfg
        train_labels = dataset_labels(cfg.data.train_path)
        val_labels = dataset_labels(cfg.data.val_path)
        self.num_classes = int(train_labels.max()) + 1
        if val_labels.max() >= self.num_classes:
            raise UserError(f"{cfg.data.val_path} has label {val_labels.max()}, but the "
                            f"training data has only {self.num_classes} classes")
        self.num_train = len(train_labels)
        if cfg.data.max_res and cfg.data.max_res < cfg.data.min_res:
            raise UserError(f"data.max_res={cfg.data.max_res} is below data.min_res="
                            f"{cfg.data.min_res} (progressive resizing only grows)")
        if cfg.data.holdout >= self.num_train:
            raise UserError(f"data.holdout={cfg.data.holdout} leaves nothing to train on "
                            f"({self.num_train} training images)")
        order = np.random.default_rng(HOLDOUT_SEED).permutation(self.num_train)
        self.holdout_indices = tuple(sorted(order[:cfg.data.holdout].tolist()))
        self.train_indices = tuple(sorted(order[cfg.data.holdout:].tolist()))

    def _load_teacher(self) -> TappedModel:
        cfg = self.cfg
        if not cfg.teacher.path:
            raise UserError(f"loss.mode={cfg.loss.mode} distils from a teacher: set "
                            "teacher.path (train one with loss.mode=pgd_at or trades)")
        if cfg.teacher.source and not Path(cfg.teacher.path).is_file():
            raise UserError(f"no teacher checkpoint {cfg.teacher.path}: {cfg.teacher.source}")
        teacher = load_teacher(cfg.teacher.arch, cfg.teacher.path, cfg.teacher.format,
                               normalization=cfg.teacher.normalization or None,
                               width_mult=cfg.teacher.width_mult,
                               trust_pickle=cfg.teacher.trust_pickle)
        if teacher.spec.num_classes != self.num_classes:
            raise UserError(f"the teacher {cfg.teacher.path} predicts "
                            f"{teacher.spec.num_classes} classes, the data has "
                            f"{self.num_classes}")
        return teacher.to(self.device, memory_format=self.memory_format)

    def _options(self, **overrides: Any) -> LoaderOptions:
        cfg = self.cfg
        base = dict(batch_size=cfg.data.batch_size, device=self.device,
                    num_workers=cfg.data.num_workers, os_cache=cfg.data.os_cache,
                    seed=cfg.training.seed)
        return LoaderOptions(**{**base, **overrides})

    def _loaders(self):
        cfg = self.cfg
        train_options = self._options(indices=self.train_indices, drop_last=True,
                                      distributed=self.world.distributed)
        eval_options = dict(order="sequential", batch_size=max(cfg.data.batch_size, 256))
        if cfg.data.pipeline == "cifar":
            # FFCV's augmentations are unseeded; crop and flip happen on the device instead.
            train = cifar_loader(cfg.data.train_path, False, train_options)
            holdout = cifar_loader(cfg.data.train_path, False, self._options(
                indices=self.holdout_indices, **eval_options)) if self.holdout_indices else None
            val = cifar_loader(cfg.data.val_path, False, self._options(**eval_options))
            self.image_size = dataset_resolution(cfg.data.train_path)
        else:
            train = ImageNetTrainLoader(cfg.data.train_path, cfg.data.min_res, train_options)
            holdout = imagenet_val_loader(cfg.data.train_path, self._options(
                indices=self.holdout_indices, **eval_options), cfg.data.val_res,
                cfg.data.val_crop_ratio) if self.holdout_indices else None
            val = imagenet_val_loader(cfg.data.val_path, self._options(**eval_options),
                                      cfg.data.val_res, cfg.data.val_crop_ratio)
            self.image_size = cfg.data.val_res
        return train, holdout, val

    def _check_teacher_accuracy(self) -> None:
        """Stop before spending the GPU-days when the teacher reads its input with the wrong
        normalization (another one does clearly better on held-out training images), or is
        near chance whatever the normalization (wrong file)."""
        if self.teacher is None or self.holdout_loader is None:
            return
        configured = self.teacher.spec.normalization
        candidates = [configured] + [n for n in ("none", self.cfg.model.normalization)
                                     if n != configured and n in NORMALIZATIONS]
        accuracy = {}
        for normalization in candidates:
            self.teacher.set_normalization(normalization)
            correct = total = 0
            with torch.no_grad():
                for x, y in self.holdout_loader:
                    correct += (self.teacher(x).argmax(1) == y).sum().item()
                    total += len(y)
            accuracy[str(normalization)] = correct / max(total, 1)
        self.teacher.set_normalization(configured)
        best = max(accuracy, key=accuracy.get)
        mine, chance = accuracy[str(configured)], 1 / self.num_classes
        path = self.cfg.teacher.path
        if accuracy[best] > mine + TEACHER_NORMALIZATION_GAP:
            raise UserError(f"the teacher {path} gets {mine:.1%} of the held-out training "
                            f"images right with normalization {configured}, but "
                            f"{accuracy[best]:.1%} with {best}: set teacher.normalization={best}")
        if mine < 1.5 * chance:
            raise UserError(f"the teacher {path} gets {mine:.1%} of the held-out training "
                            f"images right (chance is {chance:.1%}): wrong checkpoint?")

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        decay, no_decay = [], []
        for param in self.objective.parameters():
            # Norm weights and biases are the 1-D parameters.
            exempt = param.ndim <= 1 and not cfg.optim.decay_norm_and_bias
            (no_decay if exempt else decay).append(param)
        lr = cfg.optim.lr * (self.world.size if cfg.optim.lr_scaling else 1)
        return torch.optim.SGD([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}],
                               lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)

    def _prepare_run_dir(self) -> None:
        import yaml

        last = self.run_dir / LAST
        if last.exists():
            if not self.cfg.training.resume:
                raise UserError(f"{self.run_dir} already holds a run ({last}); choose another "
                                "training.out_dir, or resume it with training.resume=true")
            self._restore(last)
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG).write_text(yaml.safe_dump(self.settings, sort_keys=False))
        barrier(self.world)
        self.log = RunLog(self.run_dir, self.cfg.logging.tensorboard) if self.world.is_main \
            else None

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "augment": self.augment_rng.get_state(),
               "attack": self.attack_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        features = self.objective.features
        return model_checkpoint(
            self.student, features=None if features is None else features.state_dict(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            rng=rng, best=self.best, config=self.settings, world_size=self.world.size)

    def _save(self, name: str, state: dict[str, Any] | None = None) -> None:
        # A finite loss can still be followed by an update (or BN statistics) gone to inf:
        # never save such a state.
        finite = torch.stack([t.isfinite().all() for t in self.objective.state_dict().values()
                              if t.is_floating_point()])
        if not finite.all():
            where = (f"by the end of epoch {self.epoch}" if self.step_in_epoch == 0 else
                     f"at epoch {self.epoch + 1}, step {self.step_in_epoch}")
            raise UserError(f"the weights became non-finite {where}; stopped without saving "
                            f"(the last checkpoint is from before: {self.run_dir / LAST}). "
                            "Lower optim.lr")
        if self.world.is_main:
            atomic_save(self._state() if state is None else state, self.run_dir / name)

    def _restore(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged file must not become a traceback
            raise UserError(f"cannot resume from {path} ({str(err).splitlines()[0]}); move it "
                            "away to start over") from None
        saved = state.get("spec", {})
        if saved.get("arch") != self.student.spec.arch or \
                state["config"]["loss"]["mode"] != self.cfg.loss.mode:
            raise UserError(f"{path} is a {saved.get('arch')} run in mode "
                            f"{state['config']['loss']['mode']}; this config trains a "
                            f"{self.student.spec.arch} in mode {self.cfg.loss.mode}: use "
                            "another training.out_dir")
        self.student.load_state_dict(state["model"])
        if self.objective.features is not None:
            self.objective.features.load_state_dict(state["features"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.best = (state["epoch"], state["step_in_epoch"],
                                                     state["best"])
        torch.set_rng_state(state["rng"]["torch"])
        self.augment_rng.set_state(state["rng"]["augment"])
        self.attack_rng.set_state(state["rng"]["attack"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        print(f"resuming {path}: epoch {self.epoch}, step {self.step_in_epoch}", flush=True)

    # ------------------------------------------------------------------ the loop

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.step(training_batch(x, self.cfg.data.pipeline, self.memory_format,
                                        self.augment_rng), y)

    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        set_epoch(self.train_loader, self.epoch)
        if isinstance(self.train_loader, ImageNetTrainLoader):
            self.train_loader.set_resolution(self.train_resolution(self.epoch))
        skip, self.step_in_epoch = self.step_in_epoch, 0
        sums: dict[str, torch.Tensor] = {}
        window: list[tuple[int, torch.Tensor]] = []
        check_every = 1 if self.device.type == "cpu" else 25  # each check syncs the GPU
        start, seen = time.perf_counter(), 0
        bar = tqdm(total=self.steps_per_epoch, initial=skip, unit="step", leave=False,
                   desc=f"epoch {self.epoch + 1}/{cfg.training.epochs}",
                   disable=not (cfg.logging.progress and self.world.is_main))
        for step, (x, y) in enumerate(self.train_loader):
            if step >= self.steps_per_epoch:
                break
            if step < skip:  # resuming mid-epoch: same order, so skip what was trained
                continue
            total, parts = self.train_step(x, y)
            resolution = x.shape[-1]
            self.step_in_epoch = step + 1
            seen += len(y)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value.float()
            window.append((step, total))
            if len(window) >= check_every:
                self._check_finite(window)
                window = []
            bar.update(1)
            if step % 10 == 0 and self.world.is_main and cfg.logging.progress:
                bar.set_postfix(loss=f"{total.item():.4f}",
                                lr=f"{self.scheduler.get_last_lr()[0]:.4g}")
            if self.stop_signal is not None:
                self._check_finite(window)
                self._save(LAST)
                bar.close()
                raise _Stopped(self.stop_signal)
        self._check_finite(window)
        bar.close()
        elapsed = time.perf_counter() - start
        count = max(self.step_in_epoch - skip, 1)
        names = sorted(sums)
        reduced = all_reduce_sum(torch.stack([sums[n] for n in names] + [
            torch.tensor(float(count), device=self.device),
            torch.tensor(float(seen), device=self.device)]) if names else
            torch.tensor([float(count), float(seen)], device=self.device), self.world)
        steps_all, seen_all = reduced[-2].item(), reduced[-1].item()
        metrics = {f"loss_{n}": reduced[i].item() / steps_all for i, n in enumerate(names)}
        metrics |= {"images": int(seen_all), "images_per_s": seen_all / elapsed,
                    "epoch_time_s": elapsed}
        if seen:
            metrics["resolution"] = resolution  # as trained (progressive resizing)
        return metrics

    def _check_finite(self, window: list[tuple[int, torch.Tensor]]) -> None:
        if not window or torch.isfinite(torch.stack([t for _, t in window])).all():
            return
        step = next(s for s, t in window if not torch.isfinite(t))
        value = next(t for s, t in window if s == step).item()
        hint = "" if self.dtype == torch.float32 else ", or train in fp32 (training.precision)"
        raise UserError(f"the loss became {value} at epoch {self.epoch + 1}, step {step + 1}; "
                        f"stopped without saving (the last checkpoint is from before: "
                        f"{self.run_dir / LAST}). Lower optim.lr{hint}")

    @torch.no_grad()
    def evaluate(self, loader, steps: int) -> dict[str, float]:
        """Clean and PGD-`steps` accuracy (CE, random start, fp32, eval mode, fixed seed)."""
        generator = torch.Generator(self.device).manual_seed(self.cfg.training.seed)
        correct = torch.zeros(2, device=self.device)
        total = 0
        model = self.student.eval()
        eps = self.cfg.attack.eps
        step_size = self.cfg.attack.eval_step_size or eps / 4
        for x, y in loader:
            correct[0] += (model(x).argmax(1) == y).sum()
            x_adv = attacks.pgd_ce(model, x, y, eps, step_size, steps, True, generator)
            correct[1] += (model(x_adv).argmax(1) == y).sum()
            total += len(y)
        return {"clean_acc": correct[0].item() / total, "pgd_acc": correct[1].item() / total,
                "eval_images": total}

    def fit(self) -> int:
        cfg = self.cfg
        for sig in SIGNAL_EXIT:
            signal.signal(sig, self._request_stop)
        try:
            while self.epoch < cfg.training.epochs:
                metrics = self.train_epoch()
                self.epoch += 1
                self.step_in_epoch = 0
                record = {"kind": "epoch", "epoch": self.epoch,
                          "lr": self.scheduler.get_last_lr()[0], **metrics}
                if self.holdout_loader is not None and (self.epoch % cfg.training.eval_every == 0
                                                        or self.epoch == cfg.training.epochs):
                    if self.world.is_main:
                        held = self.evaluate(self.holdout_loader, cfg.attack.eval_steps)
                        record |= {f"holdout_{k}": v for k, v in held.items()}
                        if self.best is None or held["pgd_acc"] > self.best["pgd_acc"]:
                            self.best = {"epoch": self.epoch, **held}
                            self._save(BEST, model_checkpoint(self.student, epoch=self.epoch,
                                                              holdout=held))
                    barrier(self.world)
                self._save(LAST)
                if self.log is not None:
                    self.log.write(record)
                    print(_summary(record), flush=True)
            if self.world.is_main:
                self._final_report()
            return 0
        except _Stopped as stopped:
            if self.world.is_main:
                print(f"stopped by {signal.Signals(stopped.signum).name} at epoch "
                      f"{self.epoch + 1}, step {self.step_in_epoch}; saved "
                      f"{self.run_dir / LAST}. Run the same command to resume.", file=sys.stderr)
            return SIGNAL_EXIT[stopped.signum]
        finally:
            for sig in SIGNAL_EXIT:
                signal.signal(sig, signal.SIG_DFL)
            if self.log is not None:
                self.log.close()

    def _request_stop(self, signum: int, _frame: Any) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum

    def _final_report(self) -> None:
        """Validation accuracy of the best checkpoint (or the last, without a held-out slice)."""
        chosen = "last"
        if (self.run_dir / BEST).exists():
            state = torch.load(self.run_dir / BEST, map_location="cpu", weights_only=True)
            self.student.load_state_dict(state["model"])
            chosen = f"best (epoch {state['epoch']})"
        val = self.evaluate(self.val_loader, self.cfg.attack.eval_steps)
        record = {"kind": "final", "epoch": self.epoch, "checkpoint": chosen,
                  **{f"val_{k}": v for k, v in val.items()}}
        if self.log is not None:
            self.log.write(record)
        eps = self.cfg.attack.eps * 255
        print(f"final {chosen}: val clean {val['clean_acc']:.2%}, "
              f"PGD-{self.cfg.attack.eval_steps} (eps {eps:.3g}/255) {val['pgd_acc']:.2%} "
              f"on {val['eval_images']} images", flush=True)


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

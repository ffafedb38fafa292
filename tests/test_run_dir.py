"""What a run directory promises (README): a run is resumed only with its own settings, one
trainer at a time, only from a real training state, and bad output locations, foreign files
and torn writes are one clear line, before any work, with no file of the run changed."""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_prep import write_ffcv
from fastibd.data import inspect as inspect_data
from fastibd.eval import evaluate
from fastibd.models import build_model
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.run_dir import RunDirectory, read_metrics
from fastibd.train import main
from tests.conftest import REPO, cli_error, data_args

# piecewise: a schedule more epochs extend (onecycle, the smoke recipe's, is refused that)
RUN = ["--cfg", "smoke_teacher", "--training.epochs=2", "--training.max_steps=2",
       "--data.holdout=64", "--attack.steps=1", "--attack.eval_steps=1",
       "--logging.progress=false", "--optim.schedule=piecewise"]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file of the run below `folder` (not the lock, which says who holds it): its
    mode and its bytes' sha256."""
    return {str(p.relative_to(folder)): (p.stat().st_mode,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*RUN, *data_args(digits_dir), f"--training.out_dir={out}"]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    target.mkdir()
    for path in run.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


def refused(capsys: pytest.CaptureFixture, run: Path, argv: list[str], *needles: str) -> str:
    """The command fails with one line holding `needles`, and the run's files stay as
    they were."""
    before = snapshot(run)
    line = cli_error(main, argv, capsys)
    for needle in needles:
        assert needle in line, line
    assert snapshot(run) == before
    return line


# ------------------------------------------------------------------------- the run's identity


def test_resume_with_other_settings_is_refused(finished_run: Path, digits_dir: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    run = copy_of(finished_run, tmp_path)
    line = refused(capsys, run, [*RUN, *data_args(digits_dir), f"--training.out_dir={run}",
                                 "--optim.lr=0.05", "--attack.eps=4/255",
                                 "--data.batch_size=32", "--training.epochs=5"],
                   "other settings", "optim.lr 0.1 -> 0.05", "attack.eps", "data.batch_size",
                   "--training.resume_changed=true")
    assert "training.epochs" not in line  # more epochs is a resume, not another run


def test_resume_changed_continues_and_records_the_change(
        finished_run: Path, digits_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    run = copy_of(finished_run, tmp_path)
    config_before = (run / "config.yaml").read_bytes()
    assert main([*RUN, *data_args(digits_dir), f"--training.out_dir={run}", "--optim.lr=0.05",
                 "--training.epochs=3", "--training.resume_changed=true"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert (run / "config.yaml").read_bytes() == config_before  # as the run started
    (entry,) = yaml.safe_load((run / "config_history.yaml").read_text())
    assert entry["changes"]["optim.lr"] == {"from": 0.1, "to": 0.05}
    assert entry["changes"]["training.epochs"] == {"from": 2, "to": 3}
    assert entry["epoch"] == 2
    records = read_metrics(run)
    (resume,) = [r for r in records if r["kind"] == "resume"]
    assert resume["changes"]["optim.lr"] == [0.1, 0.05]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3]
    assert records[-2]["lr"] == 0.05  # epoch 3 ran at the new rate (0.1 came back before)


def test_resume_changed_applies_the_new_optimizer_settings(
        finished_run: Path, digits_dir: Path, tmp_path: Path) -> None:
    """The saved optimizer and schedule brought back the old lr, momentum and weight decay
    while config_history.yaml said they had changed."""
    run = copy_of(finished_run, tmp_path)
    assert main([*RUN, *data_args(digits_dir), f"--training.out_dir={run}", "--optim.lr=0.01",
                 "--optim.weight_decay=0.1", "--optim.momentum=0.5", "--training.epochs=3",
                 "--training.resume_changed=true"]) == 0
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    decayed, exempt = state["optimizer"]["param_groups"]
    assert (decayed["lr"], decayed["initial_lr"], decayed["momentum"]) == (0.01, 0.01, 0.5)
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    assert state["scheduler"]["base_lrs"] == [0.01, 0.01]


def test_more_epochs_of_a_schedule_over_all_epochs_are_refused(
        finished_run: Path, digits_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """onecycle and linear spread over training.epochs: more of them move the lr at once."""
    run = copy_of(finished_run, tmp_path)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    state["config"]["optim"]["schedule"] = "onecycle"  # as the run had been trained with it
    atomic_save(state, run / "last.pt")
    refused(capsys, run, [*RUN, *data_args(digits_dir), f"--training.out_dir={run}",
                          "--optim.schedule=onecycle", "--training.epochs=3"],
            "training.epochs 2 -> 3", "--training.resume_changed=true")


def test_resume_with_another_number_of_processes_is_refused(
        finished_run: Path, digits_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    """Steps per epoch, each process's data and the schedule's position (counted in steps)
    depend on it: a 2-process run resumed in 1 ran epoch 2 at the wrong rates."""
    run = copy_of(finished_run, tmp_path)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    atomic_save({**state, "world_size": 2}, run / "last.pt")
    refused(capsys, run, [*RUN, *data_args(digits_dir), f"--training.out_dir={run}",
                          "--training.epochs=3"],
            "trained by 2 process(es), this run has 1", "training.nproc=2")


def test_more_epochs_resume_without_a_flag(finished_run: Path, digits_dir: Path,
                                           tmp_path: Path) -> None:
    run = copy_of(finished_run, tmp_path)
    assert main([*RUN, *data_args(digits_dir), f"--training.out_dir={run}",
                 "--training.epochs=3"]) == 0
    assert [r["epoch"] for r in read_metrics(run) if r["kind"] == "epoch"] == [1, 2, 3]
    (entry,) = yaml.safe_load((run / "config_history.yaml").read_text())
    assert set(entry["changes"]) == {"training.epochs", "training.out_dir"}  # a copied run


# ------------------------------------------------------------------------------ the lock


def test_a_second_trainer_is_refused(finished_run: Path, digits_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    run = copy_of(finished_run, tmp_path)
    holder = RunDirectory(run)
    holder.lock()  # as a trainer running there holds it
    try:
        refused(capsys, run, [*RUN, *data_args(digits_dir), f"--training.out_dir={run}"],
                "in use by another trainer", f"pid {os.getpid()}")
    finally:
        holder.unlock()
    assert main([*RUN, *data_args(digits_dir), f"--training.out_dir={run}"]) == 0  # free again


def test_a_killed_trainer_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = ("import os, signal, sys\n"
            "from fastibd.run_dir import RunDirectory\n"
            "RunDirectory(sys.argv[1]).lock()\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / ".lock").exists()
    again = RunDirectory(tmp_path)
    again.lock()  # the kernel released it with the process
    again.unlock()


# -------------------------------------------------------------- what is resumed must be a state


def foreign_last(kind: str, run: Path) -> None:
    last = run / "last.pt"
    if kind == "best":
        last.write_bytes((run / "best.pt").read_bytes())
    elif kind == "tensor":
        torch.save(torch.zeros(3), last)
    elif kind == "garbage":
        last.write_bytes(b"definitely not a checkpoint")
    elif kind == "pickle":  # a class the safe unpickler refuses, as in full pickles
        torch.save({"args": argparse.Namespace(lr=0.1)}, last)


@pytest.mark.parametrize(("kind", "needle"), [
    ("best", "a model checkpoint (like best.pt), not a training state"),
    ("tensor", "holds a Tensor, not a fastibd training state"),
    ("garbage", "truncated or not a PyTorch file"),
    ("pickle", "full pickle, not a training state"),
])
def test_a_foreign_last_pt_is_one_line(kind: str, needle: str, finished_run: Path,
                                       digits_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    run = copy_of(finished_run, tmp_path)
    foreign_last(kind, run)
    line = refused(capsys, run, [*RUN, *data_args(digits_dir), f"--training.out_dir={run}"],
                   needle, "move it away")
    assert "weights_only" not in line and "\x1b" not in line


# ---------------------------------------------------------------------- outputs checked first


def test_bad_run_directories_fail_before_any_data_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    missing_data = ["--data.train_path=/nowhere/train.beton",
                    "--data.val_path=/nowhere/val.beton"]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    line = cli_error(main, [*RUN, *missing_data, f"--training.out_dir={a_file}"], capsys)
    assert "is a file, not a directory" in line
    line = cli_error(main, [*RUN, *missing_data, "--training.out_dir="], capsys)
    assert "training.out_dir is empty" in line
    locked = tmp_path / "read_only"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked
                        else real_access(p, mode))  # root may write anywhere: pretend
    line = cli_error(main, [*RUN, *missing_data, f"--training.out_dir={locked}"], capsys)
    assert "is not writable" in line
    assert list(locked.iterdir()) == []


def test_write_ffcv_checks_its_output_folder_first(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = cli_error(write_ffcv.main, ["--dataset", "digits", "--out-dir", str(a_file)], capsys)
    assert "--out-dir" in line and "is a file, not a directory" in line


def test_inspect_data_makes_the_beton_checks(tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    fake = tmp_path / "model.beton"
    torch.save({"not": "a dataset"}, fake)
    line = cli_error(inspect_data.main, [str(fake)], capsys)
    assert "not a readable .beton" in line
    line = cli_error(inspect_data.main, [str(tmp_path / "absent.beton")], capsys)
    assert "no dataset file" in line


def test_interrupted_writes_are_cleaned_at_the_next_start(
        finished_run: Path, digits_dir: Path, tmp_path: Path) -> None:
    run = copy_of(finished_run, tmp_path)
    for name in (".last.pt.abc123.tmp", ".best.pt.def456.tmp"):
        (run / name).write_bytes(b"half a checkpoint")
    assert main([*RUN, *data_args(digits_dir), f"--training.out_dir={run}"]) == 0
    assert not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------------- messages


def test_the_trainer_names_its_own_trust_flag(digits_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    teacher = tmp_path / "teacher.pt"  # a full pickle, as robustness-library files are
    torch.save({"model": build_model("resnet18", 10, "none", 1 / 8).state_dict(),
                "args": argparse.Namespace(lr=0.1)}, teacher)
    line = cli_error(main, ["--cfg", "smoke", *data_args(digits_dir),
                            f"--teacher.path={teacher}", f"--training.out_dir={tmp_path / 'r'}"],
                     capsys)
    assert "--teacher.trust_pickle=true" in line and "--trust-pickle" not in line


def test_a_dataset_given_as_a_checkpoint_does_not_suggest_unsafe_loading(
        digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = cli_error(evaluate.main, ["--ckpt", str(digits_dir / "val.beton"), "--data",
                                     str(digits_dir / "val.beton"), "--arch", "resnet18",
                                     "--out", str(tmp_path / "r.json")], capsys)
    assert "not a PyTorch checkpoint" in line and "weights_only" not in line


def test_checkpoints_get_the_mode_of_any_new_file(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        path = atomic_save(model_checkpoint(build_model("resnet18", 10, "none", 1 / 8)),
                           tmp_path / "m.pt")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644

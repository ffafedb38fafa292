"""python -m fastibd.sweep: a 2 x 2 grid of real (tiny) runs on the digits, rerun skips
what finished, the table and the figure; what would stop a run at its start is refused
before any run starts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fastibd.run_dir import LAST, METRICS_FILE
from fastibd.train import main as train_main
from fastibd.train.sweep import main, parse_grid, plan
from tests.conftest import cli_error, data_args

TINY = ["--training.epochs=1", "--training.max_steps=2", "--data.holdout=32",
        "--attack.steps=1", "--attack.eval_steps=1", "--logging.progress=false"]


def test_a_2x2_sweep_runs_skips_finished_runs_and_draws(digits_dir: Path, tmp_path: Path,
                                                         capsys) -> None:
    calls: list[list[str]] = []

    def train(argv: list[str]) -> int:
        calls.append(argv)
        return train_main(argv)

    argv = ["--cfg", "smoke_teacher", "--grid", "optim.lr=0.05,0.1",
            "--grid", "attack.eps=4/255,8/255", "--out", str(tmp_path), *TINY,
            *data_args(digits_dir)]
    assert main(argv, train=train) == 0
    names = ["lr=0.05,eps=4_255", "lr=0.05,eps=8_255", "lr=0.1,eps=4_255", "lr=0.1,eps=8_255"]
    assert [Path(a[-1].partition("=")[2]).name for a in calls] == names
    assert "--optim.lr=0.1" in calls[2] and "--attack.eps=4/255" in calls[2]
    with (tmp_path / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [r["run"] for r in rows] == names
    assert all(r["status"] == "done" and 0 <= float(r["val_pgd_acc"]) <= 1 for r in rows)
    assert [r["attack.eps"] for r in rows] == ["4/255", "8/255"] * 2
    png = (tmp_path / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    capsys.readouterr()
    calls.clear()
    assert main(argv, train=train) == 0  # everything finished: nothing trains again
    assert calls == [] and capsys.readouterr().out.count("done, skipped") == 4

    assert main([*argv, "--dry-run"], train=train) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all(" done " in line for line in printed)
    assert calls == []


def test_a_bad_combination_fails_before_any_run(tmp_path: Path, capsys) -> None:
    def train(argv: list[str]) -> int:
        raise AssertionError("nothing may train")

    line = cli_error(lambda a: main(a, train=train),
                     ["--cfg", "smoke_teacher", "--grid", "optim.lr=0.1,-1",
                      "--out", str(tmp_path)], capsys)
    assert "lr=-1" in line and "optim.lr" in line
    line = cli_error(main, ["--cfg", "smoke_teacher", "--grid", "alpha=1"], capsys)
    assert "--grid section.key=v1,v2" in line


def no_training(argv: list[str]) -> int:
    raise AssertionError("nothing may train")


@pytest.fixture
def empty_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Empty train.beton and val.beton in the (current) tmp_path: the up-front checks only
    look for the files; their overrides."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.beton", "val.beton"):
        Path(name).touch()
    return ["--data.train_path=train.beton", "--data.val_path=val.beton"]


def test_a_missing_teacher_in_the_second_combination_is_refused_before_any_run(
        empty_data: list[str], capsys) -> None:
    Path("ok.pt").touch()
    argv = ["--cfg", "smoke", "--grid", "teacher.path=ok.pt,nope.pt", "--out", "sweep",
            *empty_data]
    line = cli_error(lambda a: main(a, train=no_training), argv, capsys)
    assert line == ("fastibd.sweep: error: 1 of 2 runs to train would be refused at its start,"
                    " so none was started: path=nope.pt: no checkpoint file nope.pt")
    # a catalog teacher is not fetched by the trainer: its message says how to get it
    line = cli_error(lambda a: main(a, train=no_training),
                     [*argv, "--teacher.name=Zhang2019Theoretically"], capsys)
    assert ("path=nope.pt: no teacher checkpoint nope.pt: python -m fastibd.teachers fetch "
            "Zhang2019Theoretically") in line and "path=ok.pt" not in line
    # a distilling mode without a teacher; the mode without one passes
    line = cli_error(lambda a: main(a, train=no_training),
                     ["--cfg", "smoke_teacher", "--grid", "loss.mode=pgd_at,ibd", *empty_data],
                     capsys)
    assert line.endswith("so none was started: mode=ibd: loss.mode=ibd distils from a "
                         "teacher: set teacher.path (train one with loss.mode=pgd_at or "
                         "trades)")
    assert not Path("sweep").exists() and not Path("runs").exists()


def test_a_missing_data_file_is_refused_before_any_run(empty_data: list[str], capsys) -> None:
    line = cli_error(lambda a: main(a, train=no_training),
                     ["--cfg", "smoke_teacher", "--grid", "optim.lr=0.05,0.1", "--out", "sweep",
                      *empty_data, "--data.val_path=val.npz"], capsys)
    assert line == ("fastibd.sweep: error: 2 of 2 runs to train would be refused at their "
                    "start, so none was started: all 2 runs: no dataset file val.npz; write "
                    "one with data_prep/write_ffcv.py --format npz")
    line = cli_error(lambda a: main(a, train=no_training),
                     ["--cfg", "smoke_teacher", "--grid", "data.train_path=train.beton,b,c",
                      "--out", "sweep", *empty_data], capsys)
    assert ("2 of 3 runs to train would be refused at their start, so none was started: "
            "train_path=b: no dataset file b; write one with data_prep/write_ffcv.py; "
            "train_path=c: no dataset file c;") in line
    assert not Path("sweep").exists()


def test_the_dry_run_says_which_runs_resume(empty_data: list[str], capsys) -> None:
    argv = ["--cfg", "smoke_teacher", "--grid", "optim.lr=0.05,0.1,0.2", "--out", "sweep",
            *empty_data, "--dry-run"]
    done, partial = Path("sweep/lr=0.05"), Path("sweep/lr=0.1")
    for run in (done, partial):
        run.mkdir(parents=True)
    (done / METRICS_FILE).write_text(json.dumps({"kind": "final", "epoch": 1}) + "\n")
    (partial / LAST).touch()  # interrupted: a checkpoint, no final record
    assert main(argv, train=no_training) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" python ")[0] for line in printed] == [
        "[1/3] done   ", "[2/3] resumes", "[3/3] to run "]
    # a run it may not resume is refused up front too (the finished one is skipped)
    line = cli_error(lambda a: main(a, train=no_training),
                     [*argv, "--training.resume=false"], capsys)
    assert line.endswith("1 of 2 runs to train would be refused at its start, so none was "
                         f"started: lr=0.1: {partial} already holds a run ({partial / LAST}); "
                         "choose another training.out_dir, or resume it with "
                         "training.resume=true")


@pytest.mark.parametrize("code", [130, 143])
def test_a_run_stopped_by_a_signal_stops_the_sweep(code: int, empty_data: list[str],
                                                   capsys) -> None:
    """A SIGTERM (a cluster's preemption) ends the trainer with 143: the sweep went on to the
    next run before, as after a failure."""
    calls: list[list[str]] = []

    def stopped(argv: list[str]) -> int:
        calls.append(argv)
        return code

    argv = ["--cfg", "smoke_teacher", "--grid", "optim.lr=0.05,0.1", "--out", "sweep",
            *empty_data]
    assert main(argv, train=stopped) == code
    assert len(calls) == 1 and "interrupted; rerun the same command" in capsys.readouterr().err


def test_a_run_of_several_processes_runs_as_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's own relaunch replaces its process with torchrun: inside a sweep that
    ended the sweep after its first run (exit 0, no results.csv)."""
    from fastibd.train import sweep

    started: list[list[str]] = []
    monkeypatch.setattr("fastibd.distributed.process_count", lambda *a: 2)
    monkeypatch.setattr(sweep, "run_child", lambda cmd: started.append(cmd) or 0)
    assert sweep._train(["--cfg", "smoke_teacher", "--training.nproc=2"]) == 0
    (command,) = started
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "-m"]
    assert command[6:] == ["fastibd.train", "--cfg", "smoke_teacher", "--training.nproc=2"]


def test_grid_parsing() -> None:
    assert parse_grid("loss.alpha=0.7, 0.8,0.9") == ("loss.alpha", ["0.7", "0.8", "0.9"])
    assert parse_grid("optim.milestones=100,150;75,90") == ("optim.milestones",
                                                           ["100,150", "75,90"])
    assert parse_grid("teacher.arch+teacher.path=wrn34_10+a.pt,resnet18+b.pt") == (
        "teacher.arch+teacher.path", ["wrn34_10+a.pt", "resnet18+b.pt"])
    (first, second) = plan([parse_grid("teacher.arch+teacher.path=wrn34_10+a.pt,resnet18+b.pt"),
                            parse_grid("loss.beta=0.8")], Path("out"))
    assert first.values == {"teacher.arch": "wrn34_10", "teacher.path": "a.pt",
                            "loss.beta": "0.8"}
    assert second.directory == Path("out/arch+path=resnet18+b.pt,beta=0.8")
    for bad in ("loss.alpha", "loss.alpha=", "loss.alpha=1,,2", "loss.alpha=1,1", "=1",
                "teacher.arch+teacher.path=wrn34_10"):
        with pytest.raises(Exception, match="grid|value|parts"):
            parse_grid(bad)


def test_a_signal_to_the_sweep_reaches_its_torchrun_child_and_says_stopped(tmp_path: Path
                                                                          ) -> None:
    """torchrun exits 1 when its workers stop on SIGTERM (143): the sweep counted that as a
    failure and trained the next run; and a SIGTERM to the sweep alone left the child
    training, orphaned. The child here stands in for torchrun: it records the signal it got
    and exits 1, as torchrun does."""
    import signal
    import sys
    import threading

    from fastibd.train import sweep

    got = tmp_path / "got"
    child = (f"import signal, sys, time\n"
             f"def stop(signum, frame):\n"
             f"    open({str(got)!r}, 'w').write(str(signum)); sys.exit(1)\n"
             f"signal.signal(signal.SIGTERM, stop)\n"
             f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
             f"time.sleep(60)\n")

    def terminate_when_ready() -> None:
        for _ in range(600):
            if (tmp_path / "ready").exists():
                break
            threading.Event().wait(0.05)
        # as a scheduler sends the sweep; to the main thread, which waits for the child
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    timer = threading.Thread(target=terminate_when_ready)
    timer.start()
    assert sweep.run_child([sys.executable, "-c", child]) == 143
    timer.join()
    assert got.read_text() == str(int(signal.SIGTERM))

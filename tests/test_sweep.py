"""python -m fastibd.sweep: a 2 x 2 grid of real (tiny) runs on the digits, rerun skips
what finished, the table and the figure."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

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

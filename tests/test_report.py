"""fastibd.report on a small fake run directory laid out as fastibd.train writes one:
metrics.jsonl, best.pt, last.pt (with the attention module's state and the run's config) and a
teacher checkpoint named by that config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastibd.eval import report
from fastibd.method.loss import FeatureDistillation
from fastibd.models import build_model
from fastibd.models.checkpoint import atomic_save, model_checkpoint

ATTENTION_DIM = 16
TEACHER = ("wrn34_10", 1 / 16)  # 15 taps, the paper's teacher shape, tiny
STUDENT = ("resnet18", 1 / 8)  # 8 taps


def epoch_record(epoch: int) -> dict:
    return {"kind": "epoch", "epoch": epoch, "lr": 0.1 / epoch, "loss_total": 2.0 / epoch,
            "loss_kl_nat": 0.5 / epoch, "loss_kl_adv": 1.0 / epoch, "loss_feat": 0.3 / epoch,
            "holdout_clean_acc": 0.2 * epoch, "holdout_pgd_acc": 0.1 * epoch,
            "images_per_s": 1000.0, "epoch_time_s": 1.5}


def make_run(run_dir: Path, val: Path, ibd: bool = True) -> Path:
    """A run directory of an IBD run (or, with ibd=False, of a run without feature loss)."""
    torch.manual_seed(0)
    run_dir.mkdir(parents=True)
    teacher = build_model(TEACHER[0], 10, "none", TEACHER[1])
    teacher_path = atomic_save(model_checkpoint(teacher), run_dir.parent / "teacher.pt")
    student = build_model(STUDENT[0], 10, "none", STUDENT[1])
    t_channels = [c for c, _, _ in teacher.feature_shapes(32)]
    s_channels = [c for c, _, _ in student.feature_shapes(32)]
    features = FeatureDistillation(t_channels, s_channels, ATTENTION_DIM, backend="eager")
    config = {
        "data": {"val_path": str(val), "pipeline": "cifar", "val_res": 224},
        "teacher": {"arch": TEACHER[0], "path": str(teacher_path), "format": "auto",
                    "width_mult": TEACHER[1], "normalization": "", "trust_pickle": False},
        "loss": {"mode": "ibd" if ibd else "rslad", "attention_dim": ATTENTION_DIM},
        "attack": {"eps": 8 / 255},
    }
    atomic_save(model_checkpoint(student, epoch=2), run_dir / "best.pt")
    atomic_save(model_checkpoint(student, features=features.state_dict() if ibd else None,
                                 epoch=3, config=config), run_dir / "last.pt")
    records = [epoch_record(e) for e in (1, 2, 3)]
    records.append({"kind": "final", "epoch": 3, "val_clean_acc": 0.55, "val_pgd_acc": 0.25})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def assert_picture(path: Path) -> None:
    """A real image: a PNG of some size whose pixels are not all one colour."""
    assert path.is_file() and path.stat().st_size > 5_000, path
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 5.0, f"{path} looks blank"


def test_all_three_figures(tmp_path: Path, digits_dir: Path, capsys) -> None:
    run_dir = make_run(tmp_path / "run", digits_dir / "val.beton")
    out = tmp_path / "figs"
    args = [str(run_dir), "--data", str(digits_dir / "val.beton"), "--out", str(out),
            "--n", "32", "--eps-list", "0,4,8,16", "--steps-list", "1,2,5,10", "--device", "cpu"]
    assert report.main(args) == 0
    printed = capsys.readouterr().out
    for name in ("curves.png", "robustness.png", "attention.png"):
        assert_picture(out / name)
        assert f"wrote {out / name}" in printed
    summary = json.loads((out / "figures.json").read_text())

    assert summary["curves"]["epochs"] == [1, 2, 3]
    assert summary["curves"]["loss_feat"] == pytest.approx([0.3, 0.15, 0.1])

    robust = summary["robustness"]
    assert robust["n"] == 32 and robust["checkpoint"].endswith("best.pt")
    assert robust["vs_eps"]["eps"] == pytest.approx([0, 4 / 255, 8 / 255, 16 / 255])
    by_steps = robust["vs_steps"]["accuracy"]
    assert len(by_steps) == 4 and all(0 <= a <= 1 for a in by_steps)
    # more PGD steps from the same starts can only break more images
    assert all(a >= b for a, b in zip(by_steps, by_steps[1:], strict=False))
    assert robust["vs_eps"]["accuracy"][-1] <= robust["vs_eps"]["accuracy"][0]

    attention = np.array(summary["attention"]["mean"])
    assert attention.shape == (15, 8)  # teacher taps x student taps
    assert np.allclose(attention.sum(axis=1), 1.0, atol=1e-5)  # softmax over student taps
    assert attention.std() > 0


def test_an_l2_run_gets_l2_curves(tmp_path: Path, digits_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The report read attack.eps but not attack.norm: an L2 run (eps 0.5) got Linf PGD at
    eps 0.5 (0% everywhere) and an 'eps 127.5/255' title; and --eps refused radii above 1."""
    run_dir = make_run(tmp_path / "run", digits_dir / "val.beton", ibd=False)
    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    last["config"]["attack"] = {"eps": 1.5, "norm": "l2"}
    atomic_save(last, run_dir / "last.pt")
    norms: list[str] = []
    pgd = report.eval_attacks.pgd

    def spy(*args, **kwargs):
        norms.append(kwargs["norm"])
        return pgd(*args, **kwargs)

    monkeypatch.setattr(report.eval_attacks, "pgd", spy)
    out = tmp_path / "figs"
    assert report.main([str(run_dir), "--out", str(out), "--n", "16", "--eps-list", "0,4,8",
                        "--steps-list", "1,2", "--eps", "2.0", "--device", "cpu"]) == 0
    robust = json.loads((out / "figures.json").read_text())["robustness"]
    assert robust["vs_eps"]["norm"] == robust["vs_steps"]["norm"] == "l2"
    assert robust["vs_eps"]["eps"] == pytest.approx([0, 0.75, 1.5])  # x/8 of the run's eps
    assert (robust["vs_steps"]["eps"], robust["vs_steps"]["step_size"]) == (2.0, 0.5)
    assert norms and set(norms) == {"l2"}
    assert_picture(out / "robustness.png")


def test_missing_inputs_are_skipped_with_a_note(tmp_path: Path, digits_dir: Path,
                                                capsys) -> None:
    # a run without feature distillation, and without data to attack: curves only
    run_dir = make_run(tmp_path / "run", tmp_path / "nowhere.beton", ibd=False)
    out = tmp_path / "figs"
    assert report.main([str(run_dir), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert_picture(out / "curves.png")
    assert not (out / "robustness.png").exists() and not (out / "attention.png").exists()
    assert f"the run's {tmp_path / 'nowhere.beton'} is not there" in printed
    assert "--data; skipped the robustness curves" in printed
    assert "no attention module" in printed

    # an empty directory: every figure skipped, and that is an error (nothing was made)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "skipped the training curves" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert "nothing to draw" in line and "Traceback" not in captured.err
    assert not (empty / "figures" / "figures.json").exists()


def test_a_torn_last_metrics_line_is_skipped_with_a_note(tmp_path: Path, capsys) -> None:
    """What a run killed in the middle of writing metrics.jsonl leaves."""
    run_dir = make_run(tmp_path / "run", tmp_path / "nowhere.beton", ibd=False)
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write('{"kind": "epoch", "epoch": 9, "loss_to')
    out = tmp_path / "figs"
    assert report.main([str(run_dir), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "skipped unreadable line" in printed
    assert_picture(out / "curves.png")
    epochs = json.loads((out / "figures.json").read_text())["curves"]["epochs"]
    assert 9 not in epochs


def test_bad_run_dir_is_one_line(tmp_path: Path, capsys) -> None:
    assert report.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastibd.report: error: no run directory {tmp_path / 'missing'}"]

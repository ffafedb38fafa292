"""fastibd.eval.attacks and .evaluate: attacks on tiny nets trained here on real digits,
on a model that always predicts one class (whose numbers are known exactly), and the CLI on a
standard-trained tiny ResNet-18 written as a fastibd checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastibd.chance import chance_bound, sign_test
from fastibd.data import LoaderOptions, dataset_labels, first_examples, make_loader
from fastibd.errors import UserError
from fastibd.eval import attacks as eval_attacks
from fastibd.eval import evaluate, robustness
from fastibd.models import build_model
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.models.teachers import load_checkpoint, load_teacher
from tests.conftest import cli_error
from tests.tiny import BNNet, digits_8px, trained_bnnet

EPS = 16 / 255  # the 8x8 digits net is fairly robust at 8/255; a larger ball shows strength
TOLERANCE = 1e-6  # float32 rounding of x + delta


# ------------------------------------------------------------------------------ tiny models


class OneClass(nn.Module):
    """Always predicts class `label`: a margin of 10 that a tiny linear term (|change| < 0.02
    over the whole [0, 1] cube) cannot overturn, but which still gives attacks a gradient."""

    def __init__(self, label: int, pixels: int = 3 * 8 * 8, classes: int = 10) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(1e-4 * torch.randn(classes, pixels, generator=gen),
                                   requires_grad=False)
        bias = torch.zeros(classes)
        bias[label] = 10.0
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.t() + self.bias


@pytest.fixture(scope="module")
def trained() -> tuple[BNNet, torch.Tensor, torch.Tensor]:
    """A BNNet trained briefly on 8x8 digits (>90% val accuracy) and 64 val images."""
    model = trained_bnnet()
    model.eval().requires_grad_(False)
    x_val, y_val = digits_8px("val")
    x, y = x_val[:64], y_val[:64]
    assert (eval_attacks.predict(model, x) == y).float().mean() > 0.9
    return model, x, y


def as_batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


# ------------------------------------------------------------------------------ attacks


def test_every_attack_stays_in_the_ball_and_reports_what_it_found(trained) -> None:
    model, x, y = trained
    x, y = x[:24], y[:24]
    results = {
        "fgsm": eval_attacks.fgsm(model, x, y, EPS),
        "pgd": eval_attacks.pgd(model, x, y, EPS, 4 / 255, 5, restarts=2),
        "cw": eval_attacks.pgd(model, x, y, EPS, 4 / 255, 5, loss="cw"),
        "aa-apgd": eval_attacks.autoattack(model, x, y, EPS, "aa-apgd"),
        "square": eval_attacks.autoattack(model, x, y, EPS, "square", square_queries=100),
    }
    clean = eval_attacks.predict(model, x) == y
    for name, result in results.items():
        x_adv = result.x_adv
        assert x_adv.shape == x.shape, name
        assert (x_adv - x).abs().max() <= EPS + TOLERANCE, name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, name
        # what the attack reports is what the model does on the points it returns
        assert torch.equal(eval_attacks.predict(model, x_adv) == y, result.correct), name
        assert not (result.correct & ~clean).any(), name  # never "repairs" a clean mistake
    assert results["pgd"].correct.sum() < clean.sum()  # and the white-box attacks do bite


def test_stronger_attacks_never_score_higher(trained) -> None:
    model, x, y = trained
    settings = robustness.Settings(eps=EPS, step_size=4 / 255, num_classes=10)
    attacks = ["fgsm", "pgd5", "pgd10", "pgd20", "cw20"]
    results, kept = robustness.run_attacks(model, as_batches(x, y, 32), attacks, settings,
                                         progress=False, keep=16)
    count = {name: int(c.sum()) for name, c in results.correct.items()}
    assert results.attacks == ["clean", *attacks] and results.n == 64
    assert count["clean"] >= count["fgsm"] >= count["pgd10"] >= count["pgd20"]
    assert count["pgd5"] >= count["pgd10"] and count["clean"] >= count["cw20"]
    assert count["pgd20"] < count["clean"]
    # per example: what PGD-5 breaks, PGD-20 (same starts, more steps) breaks too
    assert not (results.correct["pgd20"] & ~results.correct["pgd5"]).any()
    robust = results.robust()
    assert int(robust.sum()) <= min(count.values())
    assert torch.equal(robust, torch.stack(list(results.correct.values())).all(0))
    assert kept is not None and len(kept[1]) == 16 and torch.equal(kept[1], y[:16])
    assert not [f for f in robustness.sanity_flags(results, None, 10, "fp32", settings)
                if f["check"] == "monotonic"]

    # one long run gives every shorter one: row k of correct_by_step is PGD-k
    long = eval_attacks.pgd(model, x, y, EPS, 2 / 255, 20, seed=3)
    rows = long.correct_by_step.int()
    assert (rows[1:] <= rows[:-1]).all()
    short = eval_attacks.pgd(model, x, y, EPS, 2 / 255, 5, seed=3)
    assert torch.equal(long.correct_by_step[5], short.correct)


def test_a_model_that_predicts_one_class_gives_exact_numbers(trained) -> None:
    _, x, y = trained
    x, y = x[:40], y[:40]
    label = int(y[0])
    share = (y == label).float().mean().item()
    model = OneClass(label)
    attacks = ["fgsm", "pgd10", "cw10", "aa-apgd", "square", "aa"]
    settings = robustness.Settings(eps=EPS, num_classes=10, square_queries=200)
    results, kept = robustness.run_attacks(model, as_batches(x, y, 20), attacks, settings,
                                         progress=False, keep=20)
    for name in results.attacks:
        assert torch.equal(results.correct[name], y == label), name
    assert results.robust().float().mean().item() == share
    huge = robustness.huge_eps_check(model, *kept, seed=0, device=torch.device("cpu"),
                                   batch_size=20)
    assert huge.accuracy == (kept[1] == label).float().mean().item() > 0
    checks = {f["check"] for f in robustness.sanity_flags(results, huge, 10, "fp32")}
    assert "huge_eps" in checks  # unbreakable even at eps 0.5: suspicious, rightly
    assert not checks & {"monotonic", "black_box"}


def test_autoattack_end_to_end_on_a_tiny_model(trained) -> None:
    model, x, y = trained
    x, y = x[:6], y[:6]
    eps = 2 * EPS  # so that on 6 images PGD surely breaks one (at 16/255 it may not)
    warnings: set[str] = set()
    result = eval_attacks.autoattack(model, x, y, eps, "aa", seed=0, square_queries=500,
                                     warnings=warnings)
    clean = eval_attacks.predict(model, x) == y
    assert (result.x_adv - x).abs().max() <= eps + TOLERANCE
    assert not (result.correct & ~clean).any()
    pgd20 = eval_attacks.pgd(model, x, y, eps, 4 / 255, 20).correct
    assert result.correct.sum() <= pgd20.sum() < clean.sum()
    assert isinstance(warnings, set)


def test_bf16_runs_and_is_flagged(trained) -> None:
    model, x, y = trained
    wrapped = evaluate.Autocast(model, torch.bfloat16)
    settings = robustness.Settings(eps=EPS, num_classes=10)
    results, _ = robustness.run_attacks(wrapped, as_batches(x[:16], y[:16], 16), ["pgd3"],
                                      settings, progress=False)
    assert results.n == 16
    assert "precision" in {f["check"] for f in robustness.sanity_flags(results, None, 10, "bf16")}


def test_masking_signs_are_flagged() -> None:
    def pattern(ones: int, n: int = 10) -> torch.Tensor:
        return torch.arange(n) < ones

    results = robustness.Results(["clean", "fgsm", "pgd20", "pgd100", "square"])
    results.correct = {"clean": pattern(9), "fgsm": pattern(6), "pgd20": pattern(3),
                       "pgd100": pattern(4), "square": pattern(1)}
    huge = robustness.HugeEpsCheck(0.5, 20, 0.05, n=10, correct=3, seconds=0.1)
    flags = robustness.sanity_flags(results, huge, 10, "fp32")
    assert [f["check"] for f in flags] == ["monotonic", "huge_eps", "black_box"]
    assert "pgd100 (40.00%)" in flags[0]["message"] and "pgd20 (30.00%)" in flags[0]["message"]

    results.correct = {"clean": pattern(9), "fgsm": pattern(6), "pgd20": pattern(3),
                       "pgd100": pattern(2), "square": pattern(5)}
    huge = robustness.HugeEpsCheck(0.5, 20, 0.05, n=10, correct=0, seconds=0.1)
    assert robustness.sanity_flags(results, huge, 10, "fp32") == []


def test_a_margin_attack_far_stronger_than_pgd_is_flagged() -> None:
    def pattern(ones: int, n: int = 100) -> torch.Tensor:
        return torch.arange(n) < ones

    def found(**accuracy: int) -> list[str]:
        results = robustness.Results(["clean", *accuracy])
        results.correct = {"clean": pattern(90)} | {k: pattern(v) for k, v in accuracy.items()}
        return [f["check"] for f in robustness.sanity_flags(results, None, 10, "fp32")]

    assert found(pgd20=80, cw20=60) == ["ce_vs_margin"]
    assert found(pgd20=57, aa=53) == []  # TRADES-like: AutoAttack ~4 points below PGD-20
    assert found(pgd5=80, cw20=60) == []  # a 5-step PGD is not a fair comparison
    assert found(fgsm=90, pgd20=90, cw20=80) == ["attack_changed_nothing", "ce_vs_margin"]


def test_strength_order() -> None:
    pairs = set(robustness.stronger_pairs(["clean", "fgsm", "pgd20", "pgd100", "cw100", "aa",
                                         "square"]))
    assert {("clean", "fgsm"), ("fgsm", "pgd20"), ("pgd20", "pgd100"), ("pgd100", "aa"),
            ("cw100", "aa"), ("fgsm", "cw100"), ("clean", "aa")} <= pairs
    assert ("pgd20", "cw100") not in pairs and ("cw100", "pgd100") not in pairs
    assert not any("square" in pair for pair in pairs)  # compared with white-box separately
    # 8 steps of 1/255 cannot cross a 8/255 ball: no claim that they beat FGSM's corner
    short = robustness.stronger_pairs(["fgsm", "pgd8", "pgd16"], 8 / 255, 1 / 255)
    assert ("fgsm", "pgd8") not in short and {("fgsm", "pgd16"), ("pgd8", "pgd16")} <= set(short)


def test_budget_and_attack_parsing() -> None:
    assert evaluate.parse_budget("8/255") == pytest.approx(8 / 255)
    assert evaluate.parse_budget("0.031") == pytest.approx(0.031)
    assert evaluate.parse_budget("1") == 1.0
    with pytest.raises(Exception) as info:
        evaluate.parse_budget("255")
    assert "the whole pixel range is 1" in str(info.value) and "255/255" not in str(info.value)
    for bad, words in (("8", ("pixel space", "did you mean 8/255?")), ("0", ("(0, 1]",)),
                       ("-2/255", ("(0, 1]",)), ("abc", ("not a number",)),
                       ("1/0", ("not a number",))):
        with pytest.raises(Exception) as info:
            evaluate.parse_budget(bad)
        assert all(w in str(info.value) for w in words), (bad, str(info.value))
    assert robustness.parse_attacks("clean, PGD20,cw100,aa,pgd20") == ["clean", "pgd20", "cw100",
                                                                     "aa"]
    for bad in ("pgd", "pgd0", "cw-5", "apgd", "fgsm,bogus", ","):
        with pytest.raises(Exception, match="attack"):
            robustness.parse_attacks(bad)


# ------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def standard_ckpt(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-18 (width 1/8, no normalization) trained without attacks on the digits
    for 4 epochs (~97% val accuracy), saved as a fastibd checkpoint."""
    options = LoaderOptions(batch_size=512, order="sequential", num_workers=2)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in
                   make_loader(digits_dir / "train.beton", "cifar", "eval", options)],
                  strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "none", 1 / 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(4):
        order = torch.randperm(len(y))
        for begin in range(0, len(y) - 63, 64):
            idx = order[begin:begin + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return atomic_save(model_checkpoint(model.eval()),
                       tmp_path_factory.mktemp("standard") / "standard.pt")


NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
PATH_LINES = ("checkpoint", "data ", "report")


def json_numbers(tree) -> list[float]:
    if isinstance(tree, bool):
        return []
    if isinstance(tree, int | float):
        return [float(tree)]
    if isinstance(tree, dict):
        return [v for value in tree.values() for v in json_numbers(value)]
    if isinstance(tree, list):
        return [v for value in tree for v in json_numbers(value)]
    return []


def assert_printed_numbers_in_json(printed: str, report: dict) -> None:
    """Every number on stdout (outside the path lines) is a JSON number, as printed (fractions
    and percentages alike)."""
    values = json_numbers(report)
    lines = [line for line in printed.splitlines() if not line.startswith(PATH_LINES)]
    tokens = NUMBER.findall("\n".join(lines).replace("/255", ""))
    assert len(tokens) > 20
    for token in tokens:
        decimals = len(token.partition(".")[2])
        shown = {f"{v:.{decimals}f}" for v in values} | {f"{100 * v:.{decimals}f}"
                                                          for v in values}
        assert token in shown, f"{token} is printed but not in the JSON report"


def test_cli_pgd_breaks_a_standard_model(standard_ckpt: Path, digits_dir: Path, tmp_path: Path,
                                         capsys) -> None:
    out = tmp_path / "report.json"
    # The smooth, upsampled digits give even a standard model a wide margin (PGD keeps ~74%
    # at 8/255, ~5% at 24/255), so "moderate" here is 32/255.
    args = ["--ckpt", str(standard_ckpt), "--data", str(digits_dir / "val.beton"),
            "--attacks", "clean,fgsm,pgd10", "--eps", "32/255", "--step-size", "4/255",
            "--n", "100",
            "--batch-size", "50", "--sanity-n", "50", "--device", "cpu", "--workers", "2",
            "--no-progress", "--out", str(out)]
    assert evaluate.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    attacks = report["attacks"]
    assert list(attacks) == ["clean", "fgsm", "pgd10"]
    assert attacks["clean"]["accuracy"] > 0.85
    assert attacks["pgd10"]["accuracy"] < 0.1  # a standard model has no robustness
    assert attacks["clean"]["accuracy"] >= attacks["fgsm"]["accuracy"] >= \
        attacks["pgd10"]["accuracy"]
    assert report["robust"]["accuracy"] == attacks["pgd10"]["accuracy"]
    assert report["robust"]["attacks"] == ["fgsm", "pgd10"]
    assert report["sanity"]["huge_eps"]["ok"] and report["sanity"]["huge_eps"]["n"] == 50
    assert report["flags"] == []
    data = report["data"]
    assert {k: v for k, v in data.items() if k != "class_counts"} == {
        "path": str((digits_dir / "val.beton").resolve()), "num_examples": 100,
        "dataset_size": 360, "num_classes": 10, "resolution": 32, "crop_ratio": None}
    labels = dataset_labels(digits_dir / "val.beton")[:100]
    assert data["class_counts"] == [int((labels == c).sum()) for c in range(10)]
    assert sum(data["class_counts"]) == 100
    assert report["model"]["trained_resolution"] == 32  # the convention: not recorded here
    assert report["sanity"]["zero_gradient"] == {"count": 0, "n": 100, "share": 0.0}
    assert set(report["sanity"]["normalization"]) == {"none", "cifar10", "cifar100", "imagenet"}
    assert report["checkpoint"]["sha256"] == hashlib.sha256(standard_ckpt.read_bytes()).hexdigest()
    assert report["model"]["arch"] == "resnet18" and report["model"]["width_mult"] == 0.125
    assert report["config"]["eps"] == pytest.approx(32 / 255)
    assert report["config"]["precision"] == "fp32"
    assert all(row["time_s"] > 0 for row in attacks.values())
    per_example = report["per_example"]
    assert all(len(bits) == 100 for bits in per_example.values())
    assert per_example["pgd10"].count("1") == attacks["pgd10"]["correct"]
    assert_printed_numbers_in_json(printed, report)
    assert "pgd10" in printed and "robust" in printed


def test_cli_smoke_ibd_student_stays_robust_where_a_standard_one_breaks(
        smoke_runs: dict[str, Path], digits_dir: Path, tmp_path: Path) -> None:
    # The README demo's runs (tests/conftest.py): measured at 16/255 on the development CPU,
    # seed 0: IBD 61.7%, standard 16.9%; seed 1: 59.2% vs 17.2% (PGD-20, all 360 val images).
    attacks = {}
    for name in ("ibd", "standard"):
        out = tmp_path / f"{name}.json"
        assert evaluate.main(["--ckpt", str(smoke_runs[name] / "best.pt"),
                              "--data", str(digits_dir / "val.beton"), "--attacks", "pgd20",
                              "--eps", "16/255", "--device", "cpu", "--no-progress",
                              "--out", str(out)]) == 0
        attacks[name] = json.loads(out.read_text())["attacks"]
    assert attacks["ibd"]["clean"]["accuracy"] > 0.85
    assert attacks["standard"]["clean"]["accuracy"] > 0.85
    assert attacks["standard"]["pgd20"]["accuracy"] < 0.3
    assert attacks["ibd"]["pgd20"]["accuracy"] > attacks["standard"]["pgd20"]["accuracy"] + 0.25


@pytest.fixture(scope="module")
def three_class_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_model("resnet18", 3, "none", 1 / 8)
    return atomic_save(model_checkpoint(model), tmp_path_factory.mktemp("three") / "three.pt")


def bad_cases(tmp: Path, ckpt: Path, three: Path, val: Path) -> dict[str, tuple[list, str]]:
    base = ["--data", str(val), "--n", "4", "--device", "cpu", "--no-progress",
            "--out", str(tmp / "r.json")]
    return {
        "missing checkpoint": (["--ckpt", str(tmp / "nowhere.pt"), *base], "no checkpoint file"),
        "architecture mismatch": (["--ckpt", str(ckpt), "--arch", "wrn34_10", *base],
                                  "holds a resnet18, not a wrn34_10"),
        "eps out of range": (["--ckpt", str(ckpt), "--eps", "8", *base], "pixel space"),
        "unknown attack": (["--ckpt", str(ckpt), "--attacks", "clean,pgd", *base],
                           "unknown attack 'pgd'"),
        "classes differ": (["--ckpt", str(three), *base],
                           "has labels 0..9 but the model in"),
        "missing data": (["--ckpt", str(ckpt), *base[2:], "--data", str(tmp / "none.beton")],
                         "no dataset file"),
        "out is a folder": (["--ckpt", str(ckpt), *base, "--out", str(tmp)], "is a directory"),
        "negative step": (["--ckpt", str(ckpt), "--step-size", "-2/255", *base],
                          "-2/255 is outside (0, 1]"),
        "checkpoint folder": (["--ckpt", str(ckpt.parent), *base],
                              f"{ckpt.parent} is a directory, not a checkpoint file (did you "
                              f"mean {ckpt}?)"),
        "data folder": (["--ckpt", str(ckpt), *base[2:], "--data", str(val.parent)],
                        f"{val.parent} is a directory, not a dataset file (did you mean "),
    }


@pytest.mark.parametrize("case", ["missing checkpoint", "architecture mismatch",
                                  "eps out of range", "unknown attack", "classes differ",
                                  "missing data", "out is a folder", "negative step",
                                  "checkpoint folder", "data folder"])
def test_cli_bad_input_is_one_line(case: str, standard_ckpt: Path, three_class_ckpt: Path,
                                   digits_dir: Path, tmp_path: Path, capsys) -> None:
    argv, expected = bad_cases(tmp_path, standard_ckpt, three_class_ckpt,
                               digits_dir / "val.beton")[case]
    line = cli_error(evaluate.main, argv, capsys)
    assert "error: " in line and expected in line, line
    assert not (tmp_path / "r.json").exists()


def test_the_center_crop_is_asked_for_else_recorded_else_the_usual_one() -> None:
    spec = build_model("resnet18", 10, "none", 1 / 8).spec
    recorded = dataclasses.replace(spec, crop_ratio=1.0)
    assert evaluate.evaluation_crop(spec, "imagenet", None) == 224 / 256
    assert evaluate.evaluation_crop(recorded, "imagenet", None) == 1.0
    assert evaluate.evaluation_crop(recorded, "imagenet", 0.5) == 0.5
    assert evaluate.evaluation_crop(recorded, "cifar", None) is None  # images as stored
    with pytest.raises(UserError, match="--crop-ratio applies to the imagenet pipeline"):
        evaluate.evaluation_crop(spec, "cifar", 0.5)


def test_autoattack_below_four_classes_is_refused_before_any_attack(
        three_class_ckpt: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """APGD-T's DLR loss reads the 3rd and 4th largest logits: pyautoattack only warns, then
    fails with an IndexError traceback."""
    rng = np.random.default_rng(0)
    data = tmp_path / "three.npz"
    np.savez(data, images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             labels=np.array([0, 1, 2, 0, 1, 2]))
    monkeypatch.setattr(evaluate, "run_attacks", lambda *a, **k: pytest.fail("attacked"))
    for attacks in ("clean,aa", "aa-apgd"):
        line = cli_error(evaluate.main, ["--ckpt", str(three_class_ckpt), "--data", str(data),
                                         "--attacks", attacks, "--device", "cpu",
                                         "--no-progress", "--out", str(tmp_path / "r.json")],
                         capsys)
        assert "at least 4 classes; the model has 3" in line, line
    with pytest.raises(ValueError, match="at least 4 classes"):
        robustness.run_attacks(nn.Identity(), iter(()), ["aa"],
                               robustness.Settings(num_classes=2), progress=False)


def test_cli_as_a_process(standard_ckpt: Path, three_class_ckpt: Path, digits_dir: Path,
                          tmp_path: Path) -> None:
    """The real `python -m fastibd.evaluate` (one case: each process imports torch and FFCV)."""
    argv, expected = bad_cases(tmp_path, standard_ckpt, three_class_ckpt,
                               digits_dir / "val.beton")["classes differ"]
    proc = subprocess.run([sys.executable, "-m", "fastibd.evaluate", *argv],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"fastibd.evaluate: error: {lines[0].partition('error: ')[2]}"]
    assert expected in lines[0] and proc.stdout == ""


def no_slow_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reading the data, loading a checkpoint and attacking fail the test if reached."""
    def reached(*args, **kwargs):
        raise AssertionError("the slow work started before the check")

    for name in ("dataset_labels", "load_evaluated", "run_attacks"):
        monkeypatch.setattr(evaluate, name, reached)


def test_an_out_that_cannot_be_written_is_refused_before_any_work(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    no_slow_work(monkeypatch)
    (tmp_path / "file").write_text("")
    (tmp_path / "locked").mkdir()
    base = ["--ckpt", str(tmp_path / "m.pt"), "--data", str(tmp_path / "v.beton")]
    cases = {
        str(tmp_path): f"--out {tmp_path} is a directory, not a file; give a file name such "
                       f"as {tmp_path / 'report.json'}",
        str(tmp_path / "file" / "r.json"): f"--out folder {tmp_path / 'file'} is a file, not "
                                           "a directory",
        str(tmp_path / "locked" / "r.json"): f"--out folder {tmp_path / 'locked'} is not "
                                             "writable",
    }
    access = os.access
    monkeypatch.setattr("fastibd.cli.os.access",  # root may write anywhere: say it may not
                        lambda path, mode: Path(path).name != "locked" and access(path, mode))
    for out, expected in cases.items():
        line = cli_error(evaluate.main, [*base, "--out", out], capsys)
        assert line == f"fastibd.evaluate: error: {expected}", line


def test_every_error_names_the_command_alike(capsys) -> None:
    """argparse's errors and the tool's own both start `fastibd.evaluate: error:`."""
    line = cli_error(evaluate.main, ["--ckpt", "m.pt", "--data", "v.beton", "--n", "0"], capsys)
    assert line.startswith("fastibd.evaluate: error: argument --n: 0 is out of range"), line


def test_the_help_describes_every_option_once() -> None:
    parser = evaluate.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    assert re.search(r"--n N\s+evaluate the first N examples \(default: all\)\n", text)
    for action in parser._actions:
        assert action.help, action.option_strings


def test_a_file_without_classifier_weights_says_what_it_is(tmp_path: Path, capsys) -> None:
    """No linear.weight / fc.weight: not a checkpoint of these models (evaluate takes no
    class count: the message must not ask for one)."""
    ckpt = tmp_path / "opt.pt"
    torch.save({"exp_avg": torch.zeros(3), "step": torch.ones(1)}, ckpt)
    data = npz(tmp_path / "v.npz", np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]))
    line = cli_error(evaluate.main, ["--ckpt", str(ckpt), "--arch", "resnet18", "--data",
                                     str(data), "--device", "cpu", "--no-progress", "--out",
                                     str(tmp_path / "r.json")], capsys)
    assert line == (f"fastibd.evaluate: error: {ckpt} holds no classifier weights "
                    "(linear.weight or fc.weight, read as format 'state_dict'; its first keys: "
                    "exp_avg, step): probably not a model checkpoint, or not in that format")
    assert "explicitly" not in line and "num_classes" not in line


# ------------------------------------------------- evaluation a wrong input cannot fool


def run_cli(argv: list[str], out: Path) -> dict:
    assert evaluate.main([*argv, "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def checks(report: dict) -> set[str]:
    return {flag["check"] for flag in report["flags"]}


@pytest.fixture(scope="module")
def val_arrays(digits_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The digits validation set as uint8 [N, H, W, 3] images and labels (for .npz files)."""
    options = LoaderOptions(batch_size=512, order="sequential", num_workers=2)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in
                   make_loader(digits_dir / "val.beton", "cifar", "eval", options)], strict=True)
    images = (torch.cat(xs) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images), torch.cat(ys).numpy()


def npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def test_a_resolution_mismatch_is_refused_unless_allowed(
        standard_ckpt: Path, val_arrays, tmp_path: Path, capsys) -> None:
    """A 32-px CIFAR network on 64x64 images runs without any error and scores garbage."""
    images, labels = val_arrays
    big = npz(tmp_path / "val64.npz", images.repeat(2, axis=1).repeat(2, axis=2), labels)
    argv = ["--ckpt", str(standard_ckpt), "--data", str(big), "--attacks", "clean", "--n", "50",
            "--sanity-n", "0"]
    line = cli_error(evaluate.main, [*argv, "--device", "cpu", "--out", str(tmp_path / "r.json")],
                     capsys)
    assert ("takes 32x32 inputs (the usual input of a resnet18: the file records none) but the "
            f"images in {big} are 64x64: pass --allow-resolution-change") in line, line
    report = run_cli([*argv, "--allow-resolution-change"], tmp_path / "r.json")
    assert report["data"]["resolution"] == 64 and report["model"]["trained_resolution"] == 32
    assert "resolution" in checks(report)

    # the imagenet pipeline: --resolution against what the file records, else the convention
    spec = build_model("resnet18_imagenet", 10, "imagenet", 1 / 8).spec
    assert evaluate.check_resolution(spec, "imagenet", big, None, False, standard_ckpt)[:2] == \
        (224, 224)
    recorded = dataclasses.replace(spec, resolution=160)
    assert evaluate.check_resolution(recorded, "imagenet", big, None, False,
                                     standard_ckpt)[:2] == (160, 160)
    with pytest.raises(UserError, match=r"takes 160x160 inputs \(recorded in the checkpoint\) "
                                        r"but --resolution is 224x224"):
        evaluate.check_resolution(recorded, "imagenet", big, 224, False, standard_ckpt)


def test_a_subset_of_the_classes_is_evaluated(standard_ckpt: Path, val_arrays,
                                              tmp_path: Path, capsys) -> None:
    """CIFAR-10 without class 9 is a valid test set for a 10-class model."""
    images, labels = val_arrays
    keep = labels != 9
    subset = npz(tmp_path / "no_nines.npz", images[keep], labels[keep])
    report = run_cli(["--ckpt", str(standard_ckpt), "--data", str(subset), "--attacks", "clean",
                      "--sanity-n", "0"], tmp_path / "r.json")
    counts = report["data"]["class_counts"]
    assert len(counts) == 10 and counts[9] == 0 and sum(counts) == int(keep.sum())
    assert counts[:9] == [int((labels == c).sum()) for c in range(9)]
    assert report["attacks"]["clean"]["accuracy"] > 0.85
    assert "9 of 10 classes" in capsys.readouterr().out


def scaled_logits_ckpt(source: Path, path: Path, factor: float = 1e4) -> Path:
    """The same network with its logits multiplied by `factor` (the last layer scaled): the
    same predictions, a softmax saturated to exactly 1 in fp32."""
    model = load_teacher(None, source)
    with torch.no_grad():
        model.linear.weight.mul_(factor)
        model.linear.bias.mul_(factor)
    return atomic_save(model_checkpoint(model), path)


@pytest.mark.parametrize("sanity_n", ["50", "0"])
def test_saturated_logits_are_flagged_without_the_huge_eps_probe(
        sanity_n: str, standard_ckpt: Path, digits_dir: Path, tmp_path: Path) -> None:
    """Logits x 1e4: FGSM and PGD change (almost) no prediction while CW breaks many."""
    masked = scaled_logits_ckpt(standard_ckpt, tmp_path / "masked.pt")
    report = run_cli(["--ckpt", str(masked), "--data", str(digits_dir / "val.beton"),
                      "--attacks", "clean,fgsm,pgd20,cw20", "--n", "100",
                      "--sanity-n", sanity_n], tmp_path / "r.json")
    attacks = report["attacks"]
    assert attacks["pgd20"]["correct"] >= attacks["clean"]["correct"] - 1
    assert attacks["cw20"]["correct"] < attacks["pgd20"]["correct"] - 5
    found = checks(report)
    assert {"loss_saturation", "attack_changed_nothing"} <= found, found
    assert report["sanity"]["zero_gradient"]["share"] > 0.5
    assert ("checks_off" in found) == (sanity_n == "0")


class Quantised(nn.Module):
    """`model` behind a 4-level input quantiser: a step function with zero gradient."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 3) / 3)


def test_an_input_quantiser_is_flagged(standard_ckpt: Path, digits_dir: Path) -> None:
    model = Quantised(load_teacher(None, standard_ckpt))
    batches = list(first_examples(digits_dir / "val.beton", "cifar", 64, 32,
                                  torch.device("cpu"), workers=2))
    batches = [(x.clone(), y.clone()) for x, y in batches]
    settings = robustness.Settings(eps=8 / 255, num_classes=10)
    results, _ = robustness.run_attacks(model, batches, ["fgsm", "pgd10", "cw10"], settings,
                                        progress=False)
    assert bool(results.zero_gradient.all())
    flags = robustness.sanity_flags(results, None, 10, "fp32", settings)
    assert "loss_saturation" in {flag["check"] for flag in flags}


def test_a_wrong_normalization_is_flagged(smoke_runs: dict[str, Path], digits_dir: Path,
                                          tmp_path: Path, capsys) -> None:
    # The standard student: read with cifar10's normalization it falls to chance (10%). The
    # IBD student loses only 11 points that way (77% against 88% on the probe's 100 images,
    # measured), under the check's 15-point gap (NORMALIZATION_GAP).
    student = smoke_runs["standard"] / "best.pt"
    loaded = load_checkpoint(None, student)
    assert loaded.model.spec.resolution == 32  # the trainer records what it evaluated at
    assert loaded.recorded["holdout"]["clean_acc"] > 0.85
    report = run_cli(["--ckpt", str(student), "--data", str(digits_dir / "val.beton"),
                      "--attacks", "clean", "--n", "200", "--normalization", "cifar10"],
                     tmp_path / "r.json")
    assert {"normalization_override", "normalization"} <= checks(report)
    assert "warning: " in capsys.readouterr().err
    probe = report["sanity"]["normalization"]
    assert probe["none"] > probe["cifar10"] + 0.15


def test_the_unmasked_digits_student_raises_no_flag(smoke_runs: dict[str, Path],
                                                    digits_dir: Path, tmp_path: Path) -> None:
    report = run_cli(["--ckpt", str(smoke_runs["ibd"] / "best.pt"),
                      "--data", str(digits_dir / "val.beton"),
                      "--attacks", "clean,fgsm,pgd20,cw20,aa-apgd", "--n", "100"],
                     tmp_path / "r.json")
    assert report["flags"] == [], report["flags"]
    assert report["sanity"]["zero_gradient"]["count"] == 0
    assert all(row["time_s"] > 0 and row["examples_per_s"] == pytest.approx(100 / row["time_s"])
               for row in report["attacks"].values())


def test_near_chance_bound_and_flag() -> None:
    """The bound against the binomial tail summed exactly (math.comb), and the flag on a CIFAR
    model's 15.56% on the digits (56 of 360) that the old 1.5x-chance rule let pass."""
    def tail(n: int, k: int, p: float) -> float:  # P(X >= k), X ~ Binomial(n, p)
        return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))

    for n, classes, alarm in ((10, 2, 1e-3), (360, 10, 1e-6), (1000, 100, 1e-6), (50, 3, 1e-2)):
        k = round(chance_bound(n, classes, alarm) * n)
        if k / n > 1.5 / classes:  # the binomial part decides: k is the smallest passing count
            assert tail(n, k, 1 / classes) <= alarm < tail(n, k - 1, 1 / classes), (n, classes)
    assert chance_bound(10, 2, 1e-3) == 1.0  # 10 of 10 coin flips: p = 1/1024 < 1e-3
    assert chance_bound(10_000, 10) == pytest.approx(0.15)  # large n: the 1.5x floor

    def results_with(correct: int, n: int = 360) -> robustness.Results:
        results = robustness.Results(["clean"])
        results.correct = {"clean": torch.arange(n) < correct}
        return results

    assert "chance" in {f["check"] for f in robustness.sanity_flags(results_with(56), None, 10,
                                                                      "fp32")}
    assert robustness.sanity_flags(results_with(300), None, 10, "fp32") == []
    (tiny,) = robustness.sanity_flags(results_with(5, n=5), None, 10, "fp32")
    assert tiny["check"] == "chance" and "even a perfect score" in tiny["message"]

    recorded = robustness.sanity_flags(results_with(150), None, 10, "fp32", recorded_clean=0.9)
    assert [f["check"] for f in recorded] == ["recorded_accuracy"]


def test_sign_test_is_the_binomial_tail() -> None:
    """Against the tail summed exactly (math.comb), and cases by hand: 1 of 1 is a coin's
    0.5; 10 of 10 is 2^-10; 12 of 14 is (1 + 14 + 91) / 2^14."""
    assert sign_test(1, 0) == pytest.approx(0.5)
    assert sign_test(10, 0) == pytest.approx(2 ** -10)
    assert sign_test(12, 2) == pytest.approx(106 / 2 ** 14)
    assert sign_test(0, 7) == 1.0
    for more, fewer in ((3, 2), (7, 0), (40, 25), (300, 240)):
        n = more + fewer
        exact = sum(math.comb(n, k) for k in range(more, n + 1)) / 2 ** n
        assert sign_test(more, fewer) == pytest.approx(exact, rel=1e-9), (more, fewer)


def test_a_weaker_attack_ahead_by_noise_is_no_flag() -> None:
    """FGSM breaking one example more than PGD-20 is noise on a sound model (the digits IBD
    student: 79% vs 80% on 100 images); breaking 12 that PGD-20 misses, against none the other
    way, is not; and a longer PGD of the same loss, which continues the shorter one, must
    never lose even one example."""
    def monotonic(**correct: list[int]) -> list[str]:
        results = robustness.Results(["clean", *correct])
        results.correct = {"clean": torch.ones(100, dtype=torch.bool)}
        for name, standing in correct.items():
            results.correct[name] = torch.zeros(100, dtype=torch.bool)
            results.correct[name][standing] = True
        return [f["message"] for f in robustness.sanity_flags(results, None, 10, "fp32")
                if f["check"] == "monotonic"]

    first = list(range(80))
    assert monotonic(fgsm=[*first[:78], 90], pgd20=first) == []  # 79 vs 80: split 2 to 1
    (message,) = monotonic(fgsm=first[:68], pgd20=first)
    assert "pgd20 (80.00%)" in message
    assert "fgsm breaks 12 of the examples pgd20 leaves standing, pgd20 0 of fgsm's" in message
    assert len(monotonic(pgd10=first[:79], pgd20=first)) == 1


def test_progress_shows_each_attack_rate_and_time_left() -> None:
    line = robustness.attack_progress({"clean": 0.5, "pgd20": 10.0, "aa": 0.0}, 100, 400)
    assert line == "clean 200 img/s, 00:01 left | pgd20 10 img/s, 00:30 left"
    assert robustness.attack_progress({"pgd20": 10.0}, 100, None) == "pgd20 10 img/s"

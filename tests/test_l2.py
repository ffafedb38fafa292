"""The L2 threat model end to end: the training attacks (PGD-L2, KL-PGD-L2, FGM), the
evaluation attacks (FGM, PGD-L2, CW-L2, AutoAttack and Square "L2"), their budgets, a tiny
L2 run through the trainer and the evaluator's --norm l2; and the Linf path unchanged."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fastibd.cli import parse_budget
from fastibd.errors import UserError
from fastibd.eval import attacks as eval_attacks
from fastibd.eval import evaluate, robustness
from fastibd.method import attacks
from fastibd.method.attacks import AttackSettings
from fastibd.train import main
from fastibd.train.settings import load_settings
from tests.conftest import cli_error, data_args
from tests.test_evaluate import standard_ckpt  # noqa: F401  (a fixture, reused)
from tests.tiny import digits_8px, trained_bnnet

EPS = 0.5  # RobustBench's CIFAR-10 L2 budget; on the 8x8 digits (d = 192) it is moderate
STEP = EPS / 4


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return trained_bnnet()


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    x, y = digits_8px("val")
    return x[:64], y[:64]


def l2_norms(x_adv: Tensor, x: Tensor) -> Tensor:
    return (x_adv - x).flatten(1).norm(dim=1)


def assert_in_l2_ball(x_adv: Tensor, x: Tensor, eps: float, moved: bool = True) -> None:
    """Within the L2 eps-ball of each example and in [0, 1]; with `moved`, the attack used
    the ball (some example at least halfway to its surface), so the check is not vacuous."""
    norms = l2_norms(x_adv, x)
    assert norms.max() <= eps * (1 + 1e-5), norms.max()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if moved:
        assert norms.max() >= eps / 2, norms.max()


# ------------------------------------------------------------------ the step, the projection


class Linear(nn.Module):
    """logits = x.flatten() @ w: the gradient of logits.sum() w.r.t. x is w for every x."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: Tensor) -> Tensor:
        return (x.flatten(1) @ self.w.flatten())[:, None]


def test_one_l2_step_moves_step_size_along_the_normalized_gradient() -> None:
    """Hand-computed: from x = 0.5, one step of a known gradient w moves exactly
    step * w / ||w||; with a smaller eps the projection scales it back to the sphere; at the
    box's edge the pixels pushed out of [0, 1] stop at it."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 4, 4, generator=gen)[0]
    model = Linear(w)
    x = torch.full((2, 3, 4, 4), 0.5)

    def step(x: Tensor, eps: float, step_size: float) -> Tensor:
        return attacks.sign_ascent(model, x, x.clone(), torch.zeros(2), eps, step_size, 1,
                                   lambda logits, _: logits.sum(), norm="l2")

    unit = w / w.norm()
    torch.testing.assert_close(step(x, 1.0, 0.1), x + 0.1 * unit, rtol=0, atol=1e-7)
    torch.testing.assert_close(step(x, 0.05, 0.1), x + 0.05 * unit, rtol=0, atol=1e-7)
    near_top = torch.full((2, 3, 4, 4), 0.99)
    torch.testing.assert_close(step(near_top, 1.0, 0.5),
                               (near_top + 0.5 * unit).clamp(0, 1), rtol=0, atol=1e-7)
    assert (step(near_top, 1.0, 0.5) == 1.0).any()  # the box did cut some pixels


def test_projection_and_a_zero_gradient() -> None:
    x = torch.full((3, 1, 2, 2), 0.5)
    far = x + torch.tensor([0.3, 0.0, -0.01]).view(3, 1, 1, 1)  # norms 0.6, 0, 0.02
    projected = attacks.project(far, x, 0.1, "l2")
    torch.testing.assert_close(l2_norms(projected, x), torch.tensor([0.1, 0.0, 0.02]))
    torch.testing.assert_close(projected[0], x[0] + 0.05)  # same direction, on the sphere
    zero = attacks.ascent_direction(torch.zeros(2, 3, 4, 4), "l2")
    assert torch.equal(zero, torch.zeros(2, 3, 4, 4))  # no step, not NaN


def test_the_l2_random_start() -> None:
    """"uniform" for L2: a random direction with a radius uniform in [0, eps] per example
    (the AT-AWP code's start); "normal": x + 0.001 N(0, 1) as for Linf (the TRADES code)."""
    x = torch.full((4000, 3, 4, 4), 0.5)
    gen = torch.Generator().manual_seed(0)
    start = attacks.attack_start(x, 0.2, "uniform", gen, "l2")
    norms = l2_norms(start, x)
    assert norms.max() <= 0.2 * (1 + 1e-5)
    assert abs(norms.mean() - 0.1) < 0.005 and abs(norms.std() - 0.2 / math.sqrt(12)) < 0.005
    directions = (start - x).flatten(1) / norms[:, None]
    assert directions.mean(dim=0).abs().max() < 0.1  # no preferred direction
    normal = attacks.attack_start(x, 0.2, "normal", torch.Generator().manual_seed(0), "l2")
    torch.testing.assert_close(normal - x, 0.001 * torch.randn(
        x.shape, generator=torch.Generator().manual_seed(0)), rtol=0, atol=1e-7)


# ------------------------------------------------------------------ the training attacks


def test_training_attacks_stay_in_the_l2_ball(model: nn.Module,
                                              digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    probs = attacks.model_probs(model, x)
    gen = torch.Generator().manual_seed(0)
    made = {
        "pgd_ce": attacks.pgd_ce(model, x, y, EPS, STEP, 5, True, gen, norm="l2"),
        "kl_pgd": attacks.kl_pgd(model, x, probs, EPS, STEP, 5, "normal", gen, norm="l2"),
        "kl_pgd uniform": attacks.kl_pgd(model, x, probs, EPS, STEP, 5, "uniform", gen,
                                         norm="l2"),
        "fgm": attacks.fgsm_rs(model, x, y, EPS, generator=gen, norm="l2"),
    }
    settings = AttackSettings(eps=EPS, step_size=STEP, steps=5, norm="l2")
    single = AttackSettings(eps=EPS, step_size=STEP, steps=1, norm="l2")
    made |= {"kl_attack": attacks.kl_attack(model, x, probs, settings, gen),
             "kl_attack fgm": attacks.kl_attack(model, x, probs, single, gen),
             "ce_attack": attacks.ce_attack(model, x, y, settings, gen),
             "ce_attack fast": attacks.ce_attack(model, x, y, settings, gen, single_step=True)}
    for name, x_adv in made.items():
        assert x_adv.shape == x.shape and not x_adv.requires_grad, name
        assert_in_l2_ball(x_adv, x, EPS)
    # the 5 steps of eps/4 reach the sphere; the Linf box of the same eps would be far larger
    assert l2_norms(made["pgd_ce"], x).median() > 0.9 * EPS
    # an L2 attack is not an Linf one: its pixels move by different amounts
    delta = (made["pgd_ce"] - x).abs().flatten(1)
    assert (delta.amax(dim=1) > 2 * delta.median(dim=1).values).all()


def test_pgd_l2_lowers_the_accuracy_of_a_standard_model(model: nn.Module,
                                                        digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    clean = (eval_attacks.predict(model, x) == y).float().mean()
    x_adv = attacks.pgd_ce(model, x, y, 1.0, 0.25, 10, True, torch.Generator().manual_seed(0),
                           norm="l2")
    attacked = (eval_attacks.predict(model, x_adv) == y).float().mean()
    assert clean > 0.9 and attacked < 0.2, (clean, attacked)


# ------------------------------------------------------------------ the evaluation attacks


def test_evaluation_attacks_stay_in_the_l2_ball(model: nn.Module,
                                                digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    clean = eval_attacks.predict(model, x) == y
    results = {"fgm": eval_attacks.fgsm(model, x, y, EPS, "l2"),
               "pgd": eval_attacks.pgd(model, x, y, EPS, STEP, 10, "ce", 2, norm="l2"),
               "cw": eval_attacks.pgd(model, x, y, EPS, STEP, 10, "cw", norm="l2")}
    for name, result in results.items():
        assert_in_l2_ball(result.x_adv, x, EPS)
        broken = clean & ~result.correct  # each broken example has its adversarial point
        assert broken.any(), name
        assert (eval_attacks.predict(model, result.x_adv[broken]) != y[broken]).all(), name
    fgm_norms = l2_norms(results["fgm"].x_adv, x)
    assert (fgm_norms[clean] > 0.5 * EPS).all()  # one full step of eps (cut by the box only)
    # more steps never break fewer: the Linf bookkeeping holds for L2
    by_step = results["pgd"].correct_by_step.sum(dim=1)
    assert (by_step[1:] <= by_step[:-1]).all()
    assert results["pgd"].correct.float().mean() < clean.float().mean() - 0.2


def test_autoattack_and_square_l2_run_on_a_tiny_model(model: nn.Module,
                                                      digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits[0][:16], digits[1][:16]
    warnings: set[str] = set()
    apgd = eval_attacks.autoattack(model, x, y, EPS, "aa-apgd", num_classes=10,
                                   warnings=warnings, norm="l2")
    assert_in_l2_ball(apgd.x_adv, x, EPS)
    assert apgd.correct.sum() < (eval_attacks.predict(model, x) == y).sum()
    assert (eval_attacks.predict(model, apgd.x_adv) == y).eq(apgd.correct).all()
    # Square needs a larger ball to break anything in a few queries on this model
    square = eval_attacks.autoattack(model, x, y, 2.0, "square", num_classes=10,
                                     square_queries=200, norm="l2")
    assert_in_l2_ball(square.x_adv, x, 2.0)
    assert not square.correct.all()


def test_attack_settings_and_the_run_attacks_path_carry_the_norm(
        model: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    x, y = digits
    settings = robustness.Settings(EPS, STEP, norm="l2")
    direct = eval_attacks.pgd(model, x, y, EPS, STEP, 10, "cw", seed=7, norm="l2")
    through = robustness.attack(model, "cw10", x, y, settings, seed=7)
    assert torch.equal(direct.x_adv, through.x_adv)
    assert robustness.attack_settings("pgd20", settings)["norm"] == "l2"
    assert robustness.attack_settings("clean", settings) == {"kind": "clean"}
    with pytest.raises(ValueError, match="spsa is implemented for --norm linf only"):
        robustness.run_attacks(model, [(x, y)], ["spsa"], settings, progress=False)
    pgd = robustness.clean_and_pgd(model, [(x, y)], EPS, STEP, 5, norm="l2")
    assert pgd["attack"] == "pgd5, L2 eps 0.5, step 0.125" and pgd["pgd_acc"] < pgd["clean_acc"]


def test_the_huge_eps_probe_in_l2(model: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    """eps 0.5 sqrt(d): the L2 ball around the Linf 0.5 ball. It leaves nothing standing."""
    x, y = digits
    assert robustness.huge_budget(x, "linf") == (0.5, 0.05)
    eps, step = robustness.huge_budget(x, "l2")
    assert eps == pytest.approx(0.5 * math.sqrt(3 * 8 * 8)) and step == pytest.approx(eps / 10)
    corner = attacks.project(x + 0.5 * torch.randn_like(x).sign(), x, 0.5)  # in the Linf ball
    assert (l2_norms(corner, x) <= eps).all()
    huge = robustness.huge_eps_check(model, x, y, seed=0, device=torch.device("cpu"),
                                     batch_size=32, norm="l2")
    assert huge.norm == "l2" and huge.eps == eps and huge.accuracy == 0.0


# ------------------------------------------------------------------ budgets


def test_budgets_above_one_are_l2_only() -> None:
    attacks.check_budget(3.0, 0.5, positive=True, norm="l2")  # ImageNet's L2 eps
    with pytest.raises(ValueError, match=r"outside \(0, 1\]: eps is measured in pixel space"):
        attacks.check_budget(3.0, 0.5, positive=True)
    with pytest.raises(ValueError, match="finite radius"):
        attacks.check_budget(float("inf"), norm="l2")
    assert parse_budget("3.0", "l2") == 3.0 and parse_budget("8/255", "l2") == 8 / 255
    with pytest.raises(argparse.ArgumentTypeError, match="did you mean 3.0/255"):
        parse_budget("3.0")
    with pytest.raises(argparse.ArgumentTypeError, match="not above 0"):
        parse_budget("-0.5", "l2")
    assert AttackSettings(eps=3.0, step_size=0.5, norm="l2").eps == 3.0
    with pytest.raises(UserError, match=r"attack.eps=3.0 is above 1.*attack.norm=l2"):
        AttackSettings(eps=3.0)
    with pytest.raises(UserError, match=r"attack.eval_step_size=2.0 is above 1"):
        AttackSettings(eval_step_size=2.0)


def test_the_l2_recipes() -> None:
    ibd, teacher = (load_settings(["--cfg", name]) for name in
                    ("cifar10_rn18_l2", "cifar10_teacher_pgdat_l2"))
    assert (ibd.attack.norm, ibd.attack.eps, ibd.attack.step_size) == ("l2", 0.5, 0.1)
    assert ibd.loss.mode == "ibd" and ibd.teacher.path == "runs/cifar10_teacher_pgdat_l2/best.pt"
    assert ibd.teacher.arch == teacher.model.arch == "preact_resnet18"
    assert (teacher.attack.norm, teacher.attack.eps) == ("l2", 0.5)
    assert teacher.attack.step_size == pytest.approx(15 / 255) and teacher.loss.mode == "pgd_at"
    paper = load_settings(["--cfg", "cifar10_rn18"])  # everything else is the Linf recipe's
    assert ibd.loss == paper.loss and ibd.optim == paper.optim and ibd.model == paper.model


# ------------------------------------------------------------------ Linf unchanged


def reference_linf_pgd(model: nn.Module, x: Tensor, target: Tensor, start: Tensor, eps: float,
                       step: float, steps: int) -> Tensor:
    """The Linf loop as it was before L2 existed (sign steps, clip to the box and [0, 1])."""
    x_adv = start
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(attacks.attack_loss(model(x_adv), target), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps)
        x_adv = x_adv.clamp(0, 1)
    return x_adv


def test_linf_is_unchanged(model: nn.Module, digits: tuple[Tensor, Tensor]) -> None:
    """Linf attacks by default, bit for bit the loop from before L2 (and its uniform start)."""
    x, y = digits
    eps, step = 16 / 255, 4 / 255
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    start = (x + (2 * noise - 1) * eps).clamp(0, 1)
    model.eval()
    expected = reference_linf_pgd(model, x, y, start, eps, step, 5)
    got = attacks.pgd_ce(model, x, y, eps, step, 5, True, torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)
    by_settings = attacks.ce_attack(model, x, y, AttackSettings(eps=eps, step_size=step, steps=5),
                                    torch.Generator().manual_seed(3))
    assert torch.equal(by_settings, expected) and AttackSettings().norm == "linf"
    assert robustness.Settings().norm == "linf"
    assert robustness.huge_budget(x) == (robustness.HUGE_EPS, robustness.HUGE_STEP_SIZE)


# ------------------------------------------------------------------ through the commands


L2_RUN = ["--training.epochs=1", "--training.max_steps=2", "--data.holdout=64",
          "--attack.norm=l2", "--attack.eps=0.5", "--attack.step_size=0.25", "--attack.steps=2",
          "--attack.eval_steps=2", "--logging.progress=false"]


def recording_norms(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The norm of every training attack's PGD loop (the evaluator's, imported by name into
    fastibd.eval.attacks, is not recorded)."""
    seen: list[str] = []
    loop = attacks.sign_ascent

    def recorded(*args, norm: str = "linf", **kwargs):
        seen.append(norm)
        return loop(*args, norm=norm, **kwargs)

    monkeypatch.setattr(attacks, "sign_ascent", recorded)
    return seen


@pytest.mark.parametrize("mode", ["pgd_at", "ibd"])
def test_a_tiny_l2_run_trains_end_to_end(mode: str, digits_dir: Path, tmp_path: Path,
                                         standard_ckpt: Path,  # noqa: F811
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PGD-AT L2 (a teacher's recipe) and IBD L2 (distilling a tiny standard teacher) train
    through fastibd.train; every training attack ran in L2."""
    norms = recording_norms(monkeypatch)
    recipe = (["--cfg", "smoke_teacher"] if mode == "pgd_at" else
              ["--cfg", "smoke", f"--teacher.path={standard_ckpt}"])
    out = tmp_path / mode
    assert main([*recipe, *L2_RUN, *data_args(digits_dir), f"--training.out_dir={out}"]) == 0
    assert norms and set(norms) == {"l2"}
    assert (out / "best.pt").is_file() and "norm: l2" in (out / "config.yaml").read_text()


def test_evaluate_with_norm_l2(standard_ckpt: Path, digits_dir: Path,  # noqa: F811
                               tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    args = ["--ckpt", str(standard_ckpt), "--data", str(digits_dir / "val.beton"),
            "--norm", "l2", "--eps", "3.0", "--attacks", "clean,fgsm,pgd5,cw5", "--n", "40",
            "--batch-size", "40", "--sanity-n", "20", "--device", "cpu", "--no-progress",
            "--out", str(out)]
    assert evaluate.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    config, attacked = report["config"], report["attacks"]
    assert (config["norm"], config["eps"], config["step_size"]) == ("l2", 3.0, 0.75)
    assert all(row["settings"]["norm"] == "l2" for name, row in attacked.items()
               if name != "clean")
    # the smooth upsampled digits are far apart (a Linf 32/255 is L2 ~7 here): 3.0 halves it
    assert attacked["clean"]["accuracy"] > 0.85 and attacked["pgd5"]["accuracy"] < 0.6
    assert attacked["clean"]["accuracy"] >= attacked["fgsm"]["accuracy"] >= \
        attacked["pgd5"]["accuracy"]
    huge = report["sanity"]["huge_eps"]
    assert huge["norm"] == "l2" and huge["eps"] == pytest.approx(0.5 * math.sqrt(3 * 32 * 32))
    assert huge["ok"]
    assert "settings    L2 eps 3, step 0.75" in printed and "at L2 eps 27.71" in printed


@pytest.mark.parametrize("argv, expected", [
    (["--eps", "3.0"], "3.0 is outside (0, 1]: budgets are in pixel space"),
    (["--norm", "l2", "--eps", "-1"], "-1 is not above 0: an L2 budget"),
    (["--norm", "l2", "--attacks", "clean,spsa"], "spsa is implemented for --norm linf only"),
])
def test_evaluate_refuses_in_one_line(argv: list[str], expected: str,
                                      standard_ckpt: Path, digits_dir: Path,  # noqa: F811
                                      tmp_path: Path, capsys) -> None:
    base = ["--ckpt", str(standard_ckpt), "--data", str(digits_dir / "val.beton"), "--n", "4",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "r.json")]
    line = cli_error(evaluate.main, [*base, *argv], capsys)
    assert "error: " in line and expected in line, line
    assert not (tmp_path / "r.json").exists()

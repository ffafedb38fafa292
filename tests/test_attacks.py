"""fastibd.method.attacks on a tiny BN conv net trained here on real digits, and on linear models
whose input gradient sign is known."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastibd.method import attacks
from tests.tiny import BNNet, digits_8px, trained_bnnet

EPS = 16 / 255  # the 8x8 digits net is fairly robust at 8/255; a larger ball shows strength


class SignLinear(nn.Module):
    """Two-class linear model: logits = (0, <s, x>). Cross-entropy toward class 0 (or KL to a
    one-hot on class 0) increases along +s, so its input-gradient sign is exactly s."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.s = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.s).flatten(1).sum(1, keepdim=True)
        return torch.cat([torch.zeros_like(score), score], dim=1)


@pytest.fixture(scope="module")
def trained() -> tuple[BNNet, torch.Tensor, torch.Tensor]:
    """A BNNet trained briefly on digits (~97% val accuracy), and 128 val images + labels."""
    model = trained_bnnet()
    x_val, y_val = digits_8px("val")
    x, y = x_val[:128], y_val[:128]
    with torch.no_grad():
        assert accuracy(model.eval(), x, y) > 0.9
    return model, x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def kl_to(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        log_q = F.log_softmax(model(x).float(), dim=1)
        return F.kl_div(log_q, target, reduction="batchmean").item()


def smoothed_labels(y: torch.Tensor) -> torch.Tensor:
    """A stand-in teacher soft label: 0.9 on the true class."""
    return F.one_hot(y, 10).float() * 0.89 + 0.011


def assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


STEP = EPS / 4  # 5 steps reach the boundary of the ball
ATTACKS: dict[str, Callable] = {
    "kl_pgd_normal": lambda m, x, y: attacks.kl_pgd(m, x, smoothed_labels(y), EPS, STEP, 5),
    "kl_pgd_uniform": lambda m, x, y: attacks.kl_pgd(
        m, x, smoothed_labels(y), EPS, STEP, 5, start="uniform"
    ),
    "kl_pgd_trades": lambda m, x, y: attacks.kl_pgd(m, x, None, EPS, STEP, 5),
    "fgsm_rs_kl": lambda m, x, y: attacks.fgsm_rs(m, x, smoothed_labels(y), EPS),
    "fgsm_rs_ce": lambda m, x, y: attacks.fgsm_rs(m, x, y, EPS),
    "pgd_ce": lambda m, x, y: attacks.pgd_ce(m, x, y, EPS, STEP, 5),
    "pgd_ce_no_start": lambda m, x, y: attacks.pgd_ce(m, x, y, EPS, STEP, 5, random_start=False),
}


# ------------------------------------------------------------------ constraints and hygiene


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_stays_in_the_ball_and_in_range(trained, name: str) -> None:
    model, x, y = trained
    # digits have many pixels at exactly 0 and 1: the [0, 1] box is active
    assert (x == 0).any() and (x == 1).any()
    x_adv = ATTACKS[name](model, x, y)
    assert_in_ball(x_adv, x, EPS)
    assert (x_adv - x).abs().max().item() > 0.9 * EPS  # it did move to the boundary


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("start_training", [True, False])
def test_attacks_run_in_eval_mode_and_restore_modes(trained, name: str, start_training: bool):
    model, x, y = trained
    model.train(start_training)
    seen_modes: list[bool] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, _: seen_modes.append(mod.training))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num" in k}
    try:
        ATTACKS[name](model, x[:16], y[:16])
    finally:
        for hook in hooks:
            hook.remove()
        training_after = [m.training for m in model.modules()]
        model.eval()
    assert seen_modes and not any(seen_modes)  # BN used running statistics throughout
    assert training_after == [start_training] * len(training_after)
    for key, value in model.state_dict().items():
        if key in buffers:
            assert torch.equal(value, buffers[key]), key


@pytest.mark.parametrize(("kind", "steps"), [("kl", 5), ("kl", 1), ("ce", 5), ("ce", 1)])
def test_train_mode_batchnorm_attacks_on_batch_statistics(trained, kind: str, steps: int):
    """attack.batchnorm=train: every attack (KL-PGD, Fast-IBD's FGSM, PGD, Fast-AT's FGSM)
    runs the training model as it is, so BatchNorm normalizes with batch statistics and
    updates its running ones once per gradient taken; the model's modes are untouched."""
    model, x, y = trained
    model = copy.deepcopy(model).train()
    seen_modes: list[bool] = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, _: seen_modes.append(mod.training))
    settings = attacks.AttackSettings(eps=EPS, step_size=STEP, steps=steps, batchnorm="train")
    counts = model.block1[1].num_batches_tracked.item()
    if kind == "kl":
        x_adv = attacks.kl_attack(model, x[:16], smoothed_labels(y[:16]), settings, None)
    else:
        x_adv = attacks.ce_attack(model, x[:16], y[:16], settings, None)
    assert_in_ball(x_adv, x[:16], EPS)
    assert seen_modes and all(seen_modes)
    assert model.block1[1].num_batches_tracked.item() == counts + steps
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="batchnorm"):
        attacks.pgd_ce(model, x[:4], y[:4], EPS, STEP, 1, batchnorm="frozen")


def test_mixed_module_modes_are_restored_exactly(trained) -> None:
    model, x, y = trained
    model.train()
    model.block1[1].eval()  # e.g. a frozen BN inside a training network
    before = [m.training for m in model.modules()]
    attacks.kl_pgd(model, x[:8], None, eps=EPS, steps=1)
    after = [m.training for m in model.modules()]
    frozen_bn, other_bn = model.block1[1].training, model.block2[1].training
    model.eval()
    assert after == before
    assert not frozen_bn and other_bn


def test_no_gradient_reaches_the_parameters(trained) -> None:
    model, x, y = trained
    for attack in ATTACKS.values():
        attack(model, x[:16], y[:16])
    assert all(p.grad is None for p in model.parameters())
    # and existing gradients are left exactly as they were
    F.cross_entropy(model(x[:16]), y[:16]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for attack in ATTACKS.values():
        attack(model, x[:16], y[:16])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    model.zero_grad(set_to_none=True)


def test_input_with_grad_and_no_grad_context(trained) -> None:
    model, x, y = trained
    x_req = x[:16].clone().requires_grad_()
    x_adv = attacks.kl_pgd(model, x_req, None, eps=EPS, steps=2)
    assert_in_ball(x_adv, x[:16], EPS)
    assert x_req.grad is None
    with torch.no_grad():  # callers often build targets under no_grad; attacks still work
        x_adv = attacks.pgd_ce(model, x[:16], y[:16], eps=EPS, steps=2)
    assert (x_adv - x[:16]).abs().max().item() > 0.9 * EPS


def test_eps_must_be_in_pixel_space(trained) -> None:
    model, x, y = trained
    with pytest.raises(ValueError, match="pixel space"):
        attacks.pgd_ce(model, x[:4], y[:4], eps=8.0)
    with pytest.raises(ValueError, match="unknown attack start"):
        attacks.kl_pgd(model, x[:4], None, start="gaussian")


# -------------------------------------------------------------------------------- strength


@pytest.mark.parametrize("target", ["teacher", "trades"])
def test_kl_pgd_raises_the_kl(trained, target: str) -> None:
    model, x, y = trained
    probs = smoothed_labels(y) if target == "teacher" else attacks.model_probs(model, x)
    gen = torch.Generator().manual_seed(0)
    x_start = attacks.attack_start(x, EPS, "normal", gen)
    corners = attacks.project(x + EPS * torch.randn(x.shape, generator=gen).sign(), x, EPS)
    x_adv = attacks.kl_pgd(model, x, None if target == "trades" else probs, eps=EPS)
    kl_start, kl_noise, kl_adv = (kl_to(model, z, probs) for z in (x_start, corners, x_adv))
    assert kl_adv > kl_start + 0.5
    # far beyond what random corners of the same ball add
    assert kl_adv - kl_start > 10 * max(kl_noise - kl_start, 1e-3)


def test_trades_target_is_the_models_clean_prediction(trained) -> None:
    model, x, y = trained
    model.train()  # the target must still be the eval-mode prediction
    got = attacks.kl_pgd(model, x[:32], None, eps=EPS, steps=3, generator=torch.Generator())
    model.eval()
    with torch.no_grad():
        probs = F.softmax(model(x[:32]), dim=1)
    want = attacks.kl_pgd(model, x[:32], probs, eps=EPS, steps=3, generator=torch.Generator())
    torch.testing.assert_close(got, want)


def test_ce_attacks_lower_accuracy(trained) -> None:
    model, x, y = trained
    clean = accuracy(model, x, y)
    pgd = accuracy(model, attacks.pgd_ce(model, x, y, eps=EPS), y)
    fgsm = accuracy(model, attacks.fgsm_rs(model, x, y, EPS), y)
    assert pgd < clean - 0.4
    assert fgsm < clean - 0.2


def test_kl_pgd_under_bf16_autocast(trained) -> None:
    model, x, y = trained
    probs = smoothed_labels(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x[:2]).dtype == torch.bfloat16  # the model really runs in bf16
        x_adv = attacks.kl_pgd(model, x, probs, eps=EPS)
    assert_in_ball(x_adv, x, EPS)
    corners = attacks.project(x + EPS * torch.randn_like(x).sign(), x, EPS)
    kl_clean, kl_noise, kl_adv = (kl_to(model, z, probs) for z in (x, corners, x_adv))
    assert kl_adv - kl_clean > 10 * max(kl_noise - kl_clean, 1e-3)


# ------------------------------------------------------------------ start and step sizes


def test_starts_and_their_spread() -> None:
    x = torch.full((40, 3, 8, 8), 0.5)  # 7680 interior pixels: no [0, 1] clipping
    eps = 0.05
    normal = attacks.kl_pgd(SignLinear(x.shape[1:], 0), x, None, eps=eps, steps=0) - x
    assert abs(normal.std().item() - 0.001) < 0.0001 and abs(normal.mean().item()) < 0.0001
    uniform = attacks.attack_start(x, eps, "uniform") - x
    assert uniform.abs().max().item() <= eps + 1e-7
    assert uniform.min().item() < -0.99 * eps and uniform.max().item() > 0.99 * eps
    assert abs(uniform.mean().item()) < 0.03 * eps
    assert abs(uniform.var().item() - eps**2 / 3) < 0.05 * eps**2 / 3  # U(-eps, eps)
    assert torch.equal(attacks.attack_start(x, eps, "none"), x)


def test_fgsm_rs_start_is_uniform_in_the_ball() -> None:
    x = torch.full((40, 3, 8, 8), 0.5)
    eps = 0.05
    delta = attacks.fgsm_rs(SignLinear(x.shape[1:], 1), x, torch.zeros(40).long(), eps, 0.0) - x
    # alpha = 0 leaves the start itself: U(-eps, eps) in each pixel, quarters equally full
    quarters = torch.histc(delta, bins=4, min=-eps, max=eps) / delta.numel()
    assert torch.all((quarters - 0.25).abs() < 0.03), quarters


@pytest.mark.parametrize(
    ("alpha_over_eps", "saturated", "floor"),
    # with a uniform start u and sign s, s * (x_adv - x) = min(s*u + alpha, eps):
    # P(at eps) = alpha / (2 eps), and it is never below alpha - eps
    [(None, 0.625, 0.25), (0.5, 0.25, -0.5), (2.0, 1.0, 1.0)],
)
def test_fgsm_rs_step(alpha_over_eps: float | None, saturated: float, floor: float) -> None:
    x = torch.full((40, 3, 8, 8), 0.5)
    eps = 0.05
    model = SignLinear(x.shape[1:], 2)
    alpha = None if alpha_over_eps is None else alpha_over_eps * eps
    labels = torch.zeros(40, dtype=torch.long)
    moved = (attacks.fgsm_rs(model, x, labels, eps, alpha) - x) * model.s  # along the gradient
    assert moved.min().item() >= floor * eps - 1e-6
    assert moved.max().item() <= eps + 1e-6
    at_eps = (moved > eps - 1e-6).float().mean().item()
    assert abs(at_eps - saturated) < 0.03
    # exactly: the seeded start, one step of alpha along +s, projected
    step = 1.25 * eps if alpha is None else alpha
    start = attacks.attack_start(x, eps, "uniform", torch.Generator().manual_seed(7))
    want = torch.clamp(start + step * model.s, min=x - eps, max=x + eps)
    got = attacks.fgsm_rs(model, x, labels, eps, alpha, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want)


def test_fgsm_rs_kl_target_follows_the_probabilities() -> None:
    x = torch.full((40, 3, 8, 8), 0.5)
    eps = 0.05
    model = SignLinear(x.shape[1:], 3)
    # KL to a one-hot on class 0 is CE toward class 0: ascend along +s; on class 1: along -s
    for cls, direction in ((0, 1.0), (1, -1.0)):
        target = F.one_hot(torch.full((40,), cls), 2).float()
        delta = attacks.fgsm_rs(model, x, target, eps, alpha=2 * eps) - x
        torch.testing.assert_close(delta, (direction * eps * model.s).expand_as(delta))

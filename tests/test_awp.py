"""Adversarial weight perturbation (fastibd.method.awp) against a port of the AWP code, and
through the trainer (a tiny AWP run, resumed bit for bit)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastibd.errors import UserError
from fastibd.method.awp import AWPSettings, WeightPerturbation, perturbed_names
from fastibd.method.modes import LossSettings, TrainingObjective
from fastibd.models import build_model
from fastibd.train import main
from tests.conftest import data_args, interrupted_at_step

# ------------------------------------------------------------------ port of the AWP code
# Written from csdongxian/AWP @ a7acf5d842fccf1bbb4b91644352ce157d370a26:
# trades_AWP/utils_awp.py (diff_in_weights, add_into_weights, TradesAWP.calc_awp) and
# AT_AWP/utils_awp.py (AdvWeightPerturb.calc_awp); the step order of
# trades_AWP/train_trades_cifar.py::train (calc_awp, perturb, loss, backward, step, restore).
# SkyKuang/IBD @ b68f057 defense/defense_utils.py carries the same AdvWeightPerturb.

PORT_EPS = 1e-20


def port_diff_in_weights(model: nn.Module, proxy: nn.Module) -> OrderedDict:
    diff = OrderedDict()
    for (old_k, old_w), (_, new_w) in zip(model.state_dict().items(),
                                          proxy.state_dict().items(), strict=True):
        if old_w.dim() <= 1:
            continue
        if "weight" in old_k:
            change = new_w - old_w
            diff[old_k] = old_w.norm() / (change.norm() + PORT_EPS) * change
    return diff


def port_add_into_weights(model: nn.Module, diff: OrderedDict, coeff: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in diff:
                param.add_(coeff * diff[name])


def port_trades_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                     beta: float) -> torch.Tensor:
    natural = F.cross_entropy(model(x), y)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1),
                      reduction="batchmean")
    return natural + beta * robust


def port_calc_awp(model: nn.Module, proxy: nn.Module, proxy_lr: float, loss_fn) -> OrderedDict:
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    proxy_optim = torch.optim.SGD(proxy.parameters(), lr=proxy_lr)
    loss = -loss_fn(proxy)
    proxy_optim.zero_grad()
    loss.backward()
    proxy_optim.step()
    return port_diff_in_weights(model, proxy)


# ------------------------------------------------------------------------------ fixtures


def tiny_student() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "none", 1 / 8).double()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # BN statistics and affine parameters that matter
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 16, 16, generator=generator, dtype=torch.float64)
    x_adv = (x + (8 / 255) * torch.sign(torch.randn(x.shape, generator=generator,
                                                   dtype=torch.float64))).clamp(0, 1)
    return x, x_adv, torch.randint(0, 10, (8,), generator=generator)


def our_step(mode: str, gamma: float, weight_decay: float = 0.0, **loss):
    """One training step with AWP as TrainingStep makes it: perturb, loss, backward, restore,
    optimizer step. Returns (student after, perturbed weights, gradients, perturbation)."""
    student = tiny_student()
    objective = TrainingObjective(student, LossSettings(mode, **loss))
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1, momentum=0.9,
                                weight_decay=weight_decay)
    awp = WeightPerturbation(objective, AWPSettings(gamma=gamma))
    x, x_adv, y = batch()
    before = copy.deepcopy(student.state_dict())
    awp.perturb(x, x_adv, y, None, None)
    perturbed = copy.deepcopy(student.state_dict())
    total, _ = objective(x, x_adv, y, None, None)
    optimizer.zero_grad()
    total.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    awp.restore()
    optimizer.step()
    change = {k: perturbed[k] - before[k] for k in before}
    return student, perturbed, grads, change, before


def port_step(mode: str, gamma: float, proxy_lr: float, beta: float = 6.0):
    """The same step as the AWP code takes it (trades_AWP/train_trades_cifar.py::train)."""
    model, x_y = tiny_student(), batch()
    x, x_adv, y = x_y
    proxy = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    if mode == "trades":
        def loss_fn(m):
            return port_trades_loss(m, x, x_adv, y, beta)
    else:  # AT_AWP/utils_awp.py: the CE of the adversarial batch
        def loss_fn(m):
            return F.cross_entropy(m(x_adv), y)
    diff = port_calc_awp(model, proxy, proxy_lr, loss_fn)
    port_add_into_weights(model, diff, gamma)
    perturbed = copy.deepcopy(model.state_dict())
    model.train()
    loss = loss_fn(model)
    optimizer.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    port_add_into_weights(model, diff, -gamma)
    return model, perturbed, grads


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", ["trades", "pgd_at"])
def test_matches_the_awp_code(mode: str) -> None:
    """Perturbed weights, the gradients they give and the weights after the step, float64;
    TRADES-AWP (gamma 5e-3, proxy lr 0.1) and AT-AWP (gamma 1e-2, proxy lr 0.01). The
    proxy's learning rate cancels in the code's normalization: ours has none."""
    gamma, proxy_lr = (5e-3, 0.1) if mode == "trades" else (1e-2, 0.01)
    loss = {"trades_beta": 6.0} if mode == "trades" else {}
    ours, our_perturbed, our_grads, _, _ = our_step(mode, gamma, **loss)
    theirs, their_perturbed, their_grads = port_step(mode, gamma, proxy_lr)
    for key, value in their_perturbed.items():
        torch.testing.assert_close(our_perturbed[key], value, rtol=1e-12, atol=1e-14)
    for key, value in their_grads.items():
        torch.testing.assert_close(our_grads[key], value, rtol=1e-10, atol=1e-13)
    # weights after: the same but for the rounding of the AWP code's w + v + update - v
    # (parameters only: the TRADES code runs model(x_natural) twice, so its BN running
    # statistics take one more update than ours; that is TRADES's loss code, not AWP)
    our_params = dict(ours.named_parameters())
    for key, value in theirs.named_parameters():
        torch.testing.assert_close(our_params[key], value, rtol=1e-12, atol=1e-14)


def test_each_layer_moves_by_gamma_and_comes_back_exactly() -> None:
    gamma = 5e-3
    student, _, grads, change, before = our_step("trades", gamma, weight_decay=5e-4,
                                                 trades_beta=6.0)
    names = perturbed_names(student)
    assert names and all("weight" in n and before[n].dim() > 1 for n in names)
    for key in before:
        if key in names:  # ||v|| = gamma ||w||, layer by layer
            ratio = change[key].norm() / before[key].norm()
            assert ratio.item() == pytest.approx(gamma, rel=1e-9), key
        else:  # BN affine parameters and buffers, biases: not moved by the perturbation
            assert torch.equal(change[key], torch.zeros_like(change[key])), key
    # weights after = weights before + the optimizer's update from those gradients, bitwise
    replay = tiny_student()
    replay.load_state_dict(before)
    optimizer = torch.optim.SGD(replay.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for name, p in replay.named_parameters():
        p.grad = grads[name]
    optimizer.step()
    for name, p in replay.named_parameters():
        assert torch.equal(p, dict(student.named_parameters())[name]), name


def test_warmup_and_modes_without_an_attack() -> None:
    objective = TrainingObjective(tiny_student(), LossSettings("pgd_at"))
    awp = WeightPerturbation(objective, AWPSettings(gamma=1e-2, warmup=2))
    before = copy.deepcopy(objective.state_dict())
    x, x_adv, y = batch()
    awp.set_epoch(1)
    awp.perturb(x, x_adv, y, None, None)
    assert all(torch.equal(before[k], v) for k, v in objective.state_dict().items())
    awp.set_epoch(2)
    awp.perturb(x, x_adv, y, None, None)
    assert not all(torch.equal(before[k], v) for k, v in objective.state_dict().items())
    awp.restore()
    for mode in ("standard", "kd", "natural_ibd"):
        with pytest.raises(UserError, match=f"loss.mode={mode} has no attack"):
            WeightPerturbation(TrainingObjective(tiny_student(), LossSettings(mode, beta=0)),
                               AWPSettings(gamma=1e-2))


AWP_RUN = ["--cfg", "smoke_teacher", "--training.epochs=2", "--training.max_steps=3",
           "--data.holdout=64", "--attack.steps=2", "--attack.eval_steps=2",
           "--awp.gamma=0.01", "--awp.warmup=1", "--logging.progress=false"]


def test_an_awp_run_trains_and_resumes_exactly(digits_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """PGD-AT + AWP through the trainer (AWP from epoch 2 on); a second run stopped by
    Ctrl-C inside epoch 2 and resumed ends with the same bits, and AWP changed the result."""
    args = [*AWP_RUN, *data_args(digits_dir)]
    assert main([*args, f"--training.out_dir={tmp_path / 'whole'}"]) == 0
    assert interrupted_at_step(args, tmp_path / "part", 3 + 2, monkeypatch) == 130
    assert main([*args, f"--training.out_dir={tmp_path / 'part'}"]) == 0
    plain = [a for a in args if not a.startswith("--awp.")]
    assert main([*plain, f"--training.out_dir={tmp_path / 'plain'}"]) == 0

    def weights(run: str) -> dict[str, torch.Tensor]:
        return torch.load(tmp_path / run / "last.pt", map_location="cpu",
                          weights_only=True)["model"]

    whole, part, without = weights("whole"), weights("part"), weights("plain")
    assert all(torch.equal(whole[k], part[k]) for k in whole)
    assert not all(torch.equal(whole[k], without[k]) for k in whole)


def test_an_ibd_step_with_awp_moves_only_the_student_and_restores_it() -> None:
    """build_step with awp: inside the step the loss sees w + v (the feature head and the
    teacher untouched); after it, the student is exactly where SGD from w takes it."""
    from fastibd.device import Runtime
    from fastibd.method.attacks import AttackSettings
    from fastibd.method.step import build_step

    torch.manual_seed(0)
    teacher = build_model("resnet18", 10, "none", 1 / 16).eval()
    student = build_model("resnet18", 10, "none", 1 / 16)
    runtime = Runtime(torch.device("cpu"), torch.float32, torch.contiguous_format, False)
    step = build_step(student, teacher, LossSettings("ibd", attention_dim=8),
                      AttackSettings(steps=2), runtime, resolution=8,
                      make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                      attack_rng=torch.Generator().manual_seed(0), awp=AWPSettings(gamma=1e-2))
    before = copy.deepcopy(step.objective.state_dict())
    seen = {}

    def record(module, args, kwargs):  # the weights the loss is computed with
        seen.update(copy.deepcopy(step.objective.state_dict()))

    handle = step.objective.register_forward_pre_hook(record, with_kwargs=True)
    step(torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    handle.remove()
    names = {f"student.{n}" for n in perturbed_names(student)}
    for key, value in before.items():
        moved = not torch.equal(seen[key], value)
        if key in names:
            ratio = (seen[key] - value).norm() / value.norm()
            assert ratio.item() == pytest.approx(1e-2, rel=1e-5), key
        elif key.startswith("features.") or "running" not in key:
            assert not moved, key  # the feature head and BN/bias parameters: not perturbed
    after = dict(step.objective.named_parameters())
    for name, p in after.items():  # plain SGD from w with the gradient taken at w + v
        # w.add(g, alpha=-lr) is SGD's own update (torch/optim/sgd.py), rounded once (a fused
        # multiply-add); w - lr * g rounds twice, an ulp off in ~9 % of elements
        torch.testing.assert_close(p, before[name].add(p.grad, alpha=-0.1), rtol=0, atol=0)

"""fastibd's method checked against ports of the original code, not against itself.

Each port below is written for this test from the upstream file it names (read at the commit
given), computing the same operations in the same order; what differs is said where it is.
The project's code is then loaded with the port's weights and must give the same numbers.

- AFD / IBD attention + distance module: clovaai/attention-feature-distillation
  `distill/AFD.py` at dd990d0bb3788b60a0b0f5d44956f54e06e314ac (SkyKuang/IBD copies the same
  classes into `defense/IBD_module.py` at b68f057cdf4611fd3d2db96a3f2ed1242484a3eb).
- IBD training step (KL-PGD attack and the loss of Eq. 16): SkyKuang/IBD
  `defense/IBD_module.py`, `Dist_Module.train`, same commit.
- RSLAD loss: zibojia/RSLAD `resnet18_rslad_cifar10.py` (`kl_loss`) and `rslad_loss.py`
  (`rslad_inner_loss`) at c40e04f6c4edcd87431d0250b168d503b1293745.
- PGD-AT's training attack on a train-mode model: csdongxian/AWP `AT_AWP/train_cifar10.py`
  (`attack_pgd`) at a7acf5d842fccf1bbb4b91644352ce157d370a26.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastibd.method import attacks
from fastibd.method.attacks import AttackSettings
from fastibd.method.loss import FeatureDistillation, rslad_loss
from fastibd.method.modes import MODES, LossSettings, TrainingObjective
from fastibd.models import build_model
from tests.tiny import TapNet

# ----------------------------------------------------------------- the port of distill/AFD.py


class PortNnBnRelu(nn.Module):
    """`nn_bn_relu`: Linear -> BatchNorm1d (-> ReLU unless relu=False)."""

    def __init__(self, nin: int, nout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(nin, nout)
        self.bn = nn.BatchNorm1d(nout)
        self.relu = nn.ReLU(False)

    def forward(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        if relu:
            return self.relu(self.bn(self.linear(x)))
        return self.bn(self.linear(x))


def port_unique_shape(shapes: list[torch.Size]) -> tuple[list[int], list[torch.Size]]:
    """`unique_shape` (IBD_module.py): index of each teacher shape among the distinct ones."""
    n_s, unique = [], []
    n = -1
    for shape in shapes:
        if shape not in unique:
            unique.append(shape)
            n += 1
        n_s.append(n)
    return n_s, unique


class PortSample(nn.Module):
    """`Sample`: every student tap's mean_c(z^2), average-pooled to one teacher size."""

    def __init__(self, t_shape: torch.Size) -> None:
        super().__init__()
        _, _, t_h, t_w = t_shape
        self.sample = nn.AdaptiveAvgPool2d((t_h, t_w))

    def forward(self, g_s: list[torch.Tensor], bs: int) -> torch.Tensor:
        return torch.stack([self.sample(f_s.pow(2).mean(1, keepdim=True)).view(bs, -1)
                            for f_s in g_s], dim=1)


class PortLinearTransformTeacher(nn.Module):
    def __init__(self, t_shapes: list[torch.Size], qk_dim: int) -> None:
        super().__init__()
        self.query_layer = nn.ModuleList([PortNnBnRelu(s[1], qk_dim) for s in t_shapes])

    def forward(self, g_t: list[torch.Tensor]):
        bs = g_t[0].size(0)
        channel_mean = [f_t.mean(3).mean(2) for f_t in g_t]
        spatial_mean = [f_t.pow(2).mean(1).view(bs, -1) for f_t in g_t]
        query = torch.stack([layer(f_t, relu=False)
                             for f_t, layer in zip(channel_mean, self.query_layer, strict=True)],
                            dim=1)
        value = [F.normalize(f_s, dim=1) for f_s in spatial_mean]
        return query, value


class PortLinearTransformStudent(nn.Module):
    def __init__(self, t_shapes: list[torch.Size], s_shapes: list[torch.Size],
                 unique_t_shapes: list[torch.Size], qk_dim: int) -> None:
        super().__init__()
        self.t, self.s, self.qk_dim = len(t_shapes), len(s_shapes), qk_dim
        self.samplers = nn.ModuleList([PortSample(shape) for shape in unique_t_shapes])
        self.key_layer = nn.ModuleList([PortNnBnRelu(s[1], qk_dim) for s in s_shapes])
        self.bilinear = PortNnBnRelu(qk_dim, qk_dim * len(t_shapes))

    def forward(self, g_s: list[torch.Tensor]):
        bs = g_s[0].size(0)
        channel_mean = [f_s.mean(3).mean(2) for f_s in g_s]
        spatial_mean = [sampler(g_s, bs) for sampler in self.samplers]
        keys = [layer(f_s) for layer, f_s in zip(self.key_layer, channel_mean, strict=True)]
        key = torch.stack(keys, dim=1).view(bs * self.s, -1)  # Bs x h
        bilinear_key = self.bilinear(key, relu=False).view(bs, self.s, self.t, -1)
        value = [F.normalize(s_m, dim=2) for s_m in spatial_mean]
        return bilinear_key, value


class PortAttention(nn.Module):
    """`Attention` with its `cal_diff`. Forward returns the per-teacher-tap losses, as the
    original; it also keeps the attention it computed in `self.atts` (for this test only)."""

    def __init__(self, t_shapes: list[torch.Size], s_shapes: list[torch.Size],
                 qk_dim: int) -> None:
        super().__init__()
        self.qk_dim = qk_dim
        self.n_t, unique_t_shapes = port_unique_shape(t_shapes)
        self.linear_trans_s = PortLinearTransformStudent(t_shapes, s_shapes, unique_t_shapes,
                                                         qk_dim)
        self.linear_trans_t = PortLinearTransformTeacher(t_shapes, qk_dim)
        self.p_t = nn.Parameter(torch.Tensor(len(t_shapes), qk_dim))
        self.p_s = nn.Parameter(torch.Tensor(len(s_shapes), qk_dim))
        torch.nn.init.xavier_normal_(self.p_t)
        torch.nn.init.xavier_normal_(self.p_s)

    def forward(self, g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> list[torch.Tensor]:
        bilinear_key, h_hat_s_all = self.linear_trans_s(g_s)
        query, h_t_all = self.linear_trans_t(g_t)
        p_logit = torch.matmul(self.p_t, self.p_s.t())
        # The line under test: the layer-embedding term is inside the 1/sqrt(d).
        logit = torch.add(torch.einsum("bstq,btq->bts", bilinear_key, query),
                          p_logit) / (self.qk_dim ** 0.5)
        atts = F.softmax(logit, dim=2)  # b x t x s
        self.atts = atts
        loss = []
        for i, (n, h_t) in enumerate(zip(self.n_t, h_t_all, strict=True)):
            loss.append(self.cal_diff(h_hat_s_all[n], h_t, atts[:, i]))
        return loss

    @staticmethod
    def cal_diff(v_s: torch.Tensor, v_t: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        diff = (v_s - v_t.unsqueeze(1)).pow(2).mean(2)
        return torch.mul(diff, att).sum(1).mean()


class PortAFD(nn.Module):
    """`AFD` / `IBD`: the taps are already selected here (guide_layers / hint_layers)."""

    def __init__(self, t_shapes: list[torch.Size], s_shapes: list[torch.Size],
                 qk_dim: int) -> None:
        super().__init__()
        self.attention = PortAttention(t_shapes, s_shapes, qk_dim)

    def forward(self, g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> torch.Tensor:
        return sum(self.attention(g_s, g_t))


# --------------------------------------------------------- weights: the port's onto ours


def port_to_fastibd(port_state: dict[str, torch.Tensor], n_t: int,
                    n_s: int) -> dict[str, torch.Tensor]:
    """The port's state_dict renamed to FeatureDistillation's (every parameter and buffer)."""
    mapping = {"attention.p_t": "attention.p_t", "attention.p_s": "attention.p_s"}
    bn_entries = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def layer(port_prefix: str, ours_prefix: str) -> None:
        for name in ("weight", "bias"):
            mapping[f"{port_prefix}.linear.{name}"] = f"{ours_prefix}.0.{name}"
        for name in bn_entries:
            mapping[f"{port_prefix}.bn.{name}"] = f"{ours_prefix}.1.{name}"

    for i in range(n_t):
        layer(f"attention.linear_trans_t.query_layer.{i}", f"attention.query.{i}")
    for j in range(n_s):
        layer(f"attention.linear_trans_s.key_layer.{j}", f"attention.key.{j}")
    layer("attention.linear_trans_s.bilinear", "attention.bilinear")
    assert set(mapping) == set(port_state), set(port_state) ^ set(mapping)
    return {mapping[k]: v.clone() for k, v in port_state.items()}


def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Every parameter and every BatchNorm running statistic random (the initial BN stats
    0 / 1 would hide a swapped mean and variance or a wrong eps)."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
        for sub in module.modules():
            if isinstance(sub, nn.BatchNorm1d):
                sub.running_mean.copy_(torch.randn(sub.running_mean.shape, generator=generator,
                                                   dtype=sub.running_mean.dtype))
                sub.running_var.copy_(0.2 + torch.rand(sub.running_var.shape,
                                                       generator=generator,
                                                       dtype=sub.running_var.dtype) * 3)
                sub.num_batches_tracked.fill_(7)


def assert_relative(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-9,
                    what: str = "") -> None:
    """max |ours - theirs| <= tol * max |theirs| (relative in the max norm)."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = theirs.abs().max().item()
    error = (ours - theirs).abs().max().item()
    assert error <= tol * scale, f"{what}: max error {error:.3e} vs max value {scale:.3e}"


def tap_shapes(arch: str) -> list[tuple[int, int, int]]:
    return build_model(arch, num_classes=10).feature_shapes(32)


WRN34_10_TAPS = [(160, 32, 32)] * 5 + [(320, 16, 16)] * 5 + [(640, 8, 8)] * 5
RESNET18_TAPS = [(64, 32, 32)] * 2 + [(128, 16, 16)] * 2 + [(256, 8, 8)] * 2 + \
    [(512, 4, 4)] * 2
# Student maps larger (9 > 7) and smaller (2 < 3) than the teacher's, sizes that do not
# divide (7 -> 3, 4 -> 3, 9 -> 5), two teacher taps of one shape (one shared sampler in the
# original, whose `unique_shape` needs equal shapes to be adjacent, as in every network),
# and an all-zero student tap (F.normalize's eps path).
ODD_TEACHER = [(5, 7, 7), (5, 7, 7), (6, 3, 3), (4, 5, 5)]
ODD_STUDENT = [(3, 9, 9), (7, 2, 2), (2, 7, 7), (4, 4, 4), (3, 6, 6)]
CASES = {
    "wrn34_10->resnet18": (WRN34_10_TAPS, RESNET18_TAPS, 128, 4, ()),
    "odd sizes": (ODD_TEACHER, ODD_STUDENT, 16, 5, (4,)),
}


def test_the_cifar_tap_lists_are_the_models_taps() -> None:
    assert tap_shapes("wrn34_10") == WRN34_10_TAPS
    assert tap_shapes("resnet18") == RESNET18_TAPS
    assert tap_shapes("preact_resnet18") == RESNET18_TAPS


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_feature_distillation_equals_the_original(case: str, training: bool) -> None:
    """Loss, attention, gradients w.r.t. the student taps and every head parameter, and the
    BatchNorm running statistics afterwards, in float64, to 1e-9 relative."""
    t_list, s_list, dim, batch, zero_taps = CASES[case]
    generator = torch.Generator().manual_seed(sum(map(ord, case)) + training)
    t_feats = [torch.randn(batch, *shape, generator=generator, dtype=torch.float64).relu()
               for shape in t_list]
    s_data = [torch.randn(batch, *shape, generator=generator, dtype=torch.float64).relu()
              for shape in s_list]
    for j in zero_taps:
        s_data[j].zero_()

    port = PortAFD([torch.Size((2, *s)) for s in t_list], [torch.Size((2, *s)) for s in s_list],
                   dim).double()
    randomize(port, generator)
    ours = FeatureDistillation([c for c, _, _ in t_list], [c for c, _, _ in s_list], dim,
                               backend="eager").double()
    ours.load_state_dict(port_to_fastibd(port.state_dict(), len(t_list), len(s_list)))
    ours_for_attention = copy.deepcopy(ours)
    port.train(training), ours.train(training), ours_for_attention.train(training)

    s_port = [z.clone().requires_grad_(True) for z in s_data]
    s_ours = [z.clone().requires_grad_(True) for z in s_data]
    want = port(s_port, t_feats)
    got = ours(t_feats, s_ours)
    attention, _ = ours_for_attention.attention_and_distances(t_feats, s_data)
    assert_relative(got, want)
    assert_relative(attention, port.attention.atts)

    want.backward()
    got.backward()
    for z_ours, z_port in zip(s_ours, s_port, strict=True):
        assert_relative(z_ours.grad, z_port.grad)
    port_grads = port_to_fastibd({k: p.grad for k, p in port.named_parameters()} |
                                 {k: b for k, b in port.named_buffers()}, len(t_list),
                                 len(s_list))
    # Some gradients are exactly 0 in exact arithmetic, and both sides hold rounding noise
    # there: a Linear bias before a train-mode BatchNorm (the batch mean removes it), and the
    # bilinear layer's biases (a shift shared by all student taps, which the softmax over
    # them removes). Those must be ~0 on the scale of the other gradients; the rest equal.
    zero = {"attention.bilinear.0.bias", "attention.bilinear.1.bias"}
    if training:
        zero |= {name for name, _ in ours.named_parameters() if name.endswith(".0.bias")}
    largest = max(g.abs().max().item() for g in port_grads.values() if g.is_floating_point())
    for name, param in ours.named_parameters():
        if name in zero:
            assert max(param.grad.abs().max(), port_grads[name].abs().max()) < 1e-12 * largest
        else:
            assert_relative(param.grad, port_grads[name], what=name)
    port_buffers = port_to_fastibd(port.state_dict(), len(t_list), len(s_list))
    for name, buffer in ours.named_buffers():
        assert_relative(buffer.double(), port_buffers[name].double())


# ----------------------------------------------- the port of IBD's Dist_Module.train step


def port_ibd_step(student: nn.Module, teacher: nn.Module, ibd: PortAFD, inputs: torch.Tensor,
                  noise: torch.Tensor, a: float, b: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`Dist_Module.train` up to `loss.backward()`; returns (loss, x_adv).

    As the original: the start is inputs + 0.001 * noise (not clamped), ten signed steps of
    2/255 on KLDivLoss(sum) to the teacher's softmax with the student in eval mode, then the
    student in train mode on the clean and the adversarial batch, KL(sum) / batch, and the
    feature loss between the student's adversarial taps and the teacher's taps. One change:
    the teacher sees `inputs`, where the original gives it the start point (the 0.001 noise;
    fastibd's documented choice, docs/method.md)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    student.eval()
    teacher.eval()
    batch_size = len(inputs)
    x_adv = inputs.detach() + 0.001 * noise
    logits_tea, feat_list_tea = teacher(inputs, True)
    feat_list_tea = [f.detach() for f in feat_list_tea]
    logits_tea = logits_tea.detach()
    for _ in range(10):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_adv = criterion_kl(F.log_softmax(student(x_adv), dim=1),
                                    F.softmax(logits_tea, dim=1))
        grad = torch.autograd.grad(loss_adv, [x_adv])[0]
        x_adv = x_adv.detach() + 2 / 255 * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, inputs - 8 / 255), inputs + 8 / 255)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    adv_inputs = torch.clamp(x_adv, 0.0, 1.0).detach()

    student.train()
    ibd.train()
    logits_nat, _ = student(inputs, True)
    logits_adv, feat_list_adv = student(adv_inputs, True)
    loss_ibd = ibd(feat_list_adv, feat_list_tea)
    loss_nat = (1.0 / batch_size) * criterion_kl(F.log_softmax(logits_nat, dim=1),
                                                 F.softmax(logits_tea, dim=1))
    loss_adv = (1.0 / batch_size) * criterion_kl(F.log_softmax(logits_adv, dim=1),
                                                 F.softmax(logits_tea, dim=1))
    return loss_nat * (1 - a) + loss_adv * a + loss_ibd * b, adv_inputs


def test_ibd_training_step_equals_the_original() -> None:
    """The attack, the loss and every gradient of one IBD step (alpha = beta = 0.8, as the
    code's train loop), fp32 models, from the same starting noise."""
    teacher = TapNet((6, 8, 10), batchnorm=True, seed=1)
    student = TapNet((4, 6), batchnorm=True, seed=2)
    generator = torch.Generator().manual_seed(3)
    # Images away from 0 and 1, so the original's unclamped start and ours coincide.
    x = 0.05 + 0.9 * torch.rand(6, 3, 12, 12, generator=generator)
    with torch.no_grad():  # a trained-looking teacher: BN statistics of the data, eval mode
        teacher.train()(x)
    t_shapes = [torch.Size((2, *t.shape[1:])) for t in teacher(x[:2], True)[1]]
    s_shapes = [torch.Size((2, *t.shape[1:])) for t in student(x[:2], True)[1]]
    port_head = PortAFD(t_shapes, s_shapes, qk_dim=8)
    ours_head = FeatureDistillation([s[1] for s in t_shapes], [s[1] for s in s_shapes], 8,
                                    backend="eager")
    ours_head.load_state_dict(port_to_fastibd(port_head.state_dict(), 3, 2))
    ours_student = copy.deepcopy(student)

    noise_rng = torch.Generator().manual_seed(4)
    noise = torch.randn(x.shape, generator=noise_rng)
    want, x_adv_port = port_ibd_step(student, teacher, port_head, x, noise, 0.8, 0.8)

    teacher.eval()
    with torch.no_grad():
        teacher_logits, teacher_feats = teacher(x, features=True)
    probs = F.softmax(teacher_logits, dim=1)
    settings = AttackSettings(eps=8 / 255, step_size=2 / 255, steps=10, start="normal")
    x_adv = MODES["ibd"].adversarial(ours_student, x, None, probs, settings,
                                     torch.Generator().manual_seed(4))
    torch.testing.assert_close(x_adv, x_adv_port, rtol=0, atol=0)
    objective = TrainingObjective(ours_student, LossSettings("ibd", alpha=0.8, beta=0.8),
                                  ours_head).train()
    got, _ = objective(x, x_adv, None, probs, teacher_feats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)

    want.backward()
    got.backward()
    for (name, ours_param), port_param in zip(ours_student.named_parameters(),
                                              student.parameters(), strict=True):
        torch.testing.assert_close(ours_param.grad, port_param.grad, rtol=1e-4, atol=1e-6,
                                   msg=name)
    port_grads = port_to_fastibd({k: p.grad for k, p in port_head.named_parameters()} |
                                 dict(port_head.named_buffers()), 3, 2)
    for name, param in ours_head.named_parameters():
        torch.testing.assert_close(param.grad, port_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


# ------------------------------------------------------------------------- RSLAD's loss


def port_rslad_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`kl_loss` of RSLAD's training scripts: elementwise, a = log-probabilities."""
    return -a * b + torch.log(b + 1e-5) * b


def test_rslad_loss_equals_rslad_code() -> None:
    """RSLAD averages its elementwise KL over B*K (torch.mean), 5/6 adversarial + 1/6
    natural. Gradients equal exactly; the values differ only by RSLAD's log(p + 1e-5)."""
    generator = torch.Generator().manual_seed(5)
    s_nat = torch.randn(7, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    s_adv = torch.randn(7, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(7, 10, generator=generator, dtype=torch.float64)
    p = F.softmax(teacher_logits, dim=1)
    kl_adv = torch.mean(port_rslad_kl(F.log_softmax(s_adv, dim=1), p))
    kl_nat = torch.mean(port_rslad_kl(F.log_softmax(s_nat, dim=1), p))
    want = 5 / 6.0 * kl_adv + 1 / 6.0 * kl_nat
    got = rslad_loss(s_nat, s_adv, p).total
    assert abs(got.item() - want.item()) < 2e-5  # the 1e-5 inside RSLAD's log, nothing else
    want_grads = torch.autograd.grad(want, [s_nat, s_adv])
    got_grads = torch.autograd.grad(got, [s_nat, s_adv])
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_relative(g, w)
    # and it is RSLAD's scale: 1/K of IBD's batch-mean KL, not the batch-mean itself
    batchmean = 5 / 6 * F.kl_div(F.log_softmax(s_adv, 1), p, reduction="batchmean")
    assert got.item() == pytest.approx(
        (batchmean + F.kl_div(F.log_softmax(s_nat, 1), p, reduction="batchmean") / 6).item()
        / 10, rel=1e-12)


def test_rslad_attack_equals_rslad_inner_loss() -> None:
    """`rslad_inner_loss`'s KL-PGD: x + 0.001 N(0,1), ten signed steps on the summed KL to
    the teacher's softmax, projected; the model in eval mode."""
    model = TapNet((4, 6), batchnorm=True, seed=6)
    generator = torch.Generator().manual_seed(7)
    x = 0.05 + 0.9 * torch.rand(5, 3, 8, 8, generator=generator)
    teacher_logits = torch.randn(5, 10, generator=generator)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    model.eval()
    x_adv = x.detach() + 0.001 * noise
    for _ in range(10):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = torch.sum(nn.KLDivLoss(reduction="none")(
                F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_logits, dim=1)))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + 2 / 255 * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - 8 / 255), x + 8 / 255)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    got = attacks.kl_pgd(model, x, F.softmax(teacher_logits, dim=1), 8 / 255, 2 / 255, 10,
                         "normal", torch.Generator().manual_seed(8))
    torch.testing.assert_close(got, x_adv, rtol=0, atol=0)
    assert model.training


# ------------------------------------ the port of AT_AWP/train_cifar10.py (`attack_pgd`)


def port_at_awp_attack_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float,
                           alpha: float, attack_iters: int, start: torch.Tensor
                           ) -> torch.Tensor:
    """`attack_pgd` of csdongxian/AWP `AT_AWP/train_cifar10.py` at
    a7acf5d842fccf1bbb4b91644352ce157d370a26, Linf, one restart, no early stop, as its
    training loop calls it: on the model in whatever mode it is in (train, from the loop's
    `model.train()`), each step a mean cross-entropy `loss.backward()` into delta. What
    differs: `start` is the uniform delta it draws (ours, so both begin at one point); the
    model normalizes inside (the code's `normalize`), and it has no upper/lower limits other
    than [0, 1]."""
    delta = start.clone()
    delta = torch.max(torch.min(delta, 1 - x), 0 - x)  # clamp(delta, lower - X, upper - X)
    delta.requires_grad = True
    for _ in range(attack_iters):
        output = model(x + delta)
        loss = F.cross_entropy(output, y)
        loss.backward()
        grad = delta.grad.detach()
        d = torch.clamp(delta + alpha * torch.sign(grad), min=-epsilon, max=epsilon)
        d = torch.max(torch.min(d, 1 - x), 0 - x)
        delta.data = d
        delta.grad.zero_()
    return (x + delta).detach()


def test_pgd_at_attack_with_train_mode_batchnorm_equals_the_at_awp_code() -> None:
    """attack.batchnorm=train (the cifar10_teacher_pgdat recipes): pgd_ce attacks the
    training student on batch statistics, as AT-AWP's `attack_pgd` (the PGD-AT code of Rice
    et al.): the same x_adv, and the same BatchNorm running statistics afterwards (each step
    updates them); with the default (eval) the statistics stay and x_adv differs."""
    model = TapNet((4, 6), batchnorm=True, seed=9)
    generator = torch.Generator().manual_seed(10)
    x = torch.rand(6, 3, 8, 8, generator=generator)
    x[:, :, :2] = 0.0  # pixels at the box's edge
    y = torch.randint(0, 10, (6,), generator=generator)
    eps, alpha = 8 / 255, 2 / 255
    start = (2.0 * torch.rand(x.shape, generator=torch.Generator().manual_seed(11)) - 1.0) * eps
    port_model = copy.deepcopy(model).train()
    want = port_at_awp_attack_pgd(port_model, x, y, eps, alpha, 10, start)
    model.train()
    got = attacks.pgd_ce(model, x, y, eps, alpha, 10, generator=torch.Generator().manual_seed(11),
                         batchnorm="train")
    assert model.training
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for (name, ours), theirs in zip(model.named_buffers(), port_model.buffers(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)
    before = copy.deepcopy(model.state_dict())
    in_eval = attacks.pgd_ce(model, x, y, eps, alpha, 10,
                             generator=torch.Generator().manual_seed(11))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (in_eval - got).abs().max() > 1e-3

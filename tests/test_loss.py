"""fastibd.method.loss: attention, feature loss and its backend switch, soft-label objectives."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fastibd.method import attacks, loss
from fastibd.method.loss import AttentionModule, FeatureDistillation
from kernels import reference
from tests.tiny import TapNet


def random_taps(batch: int, shapes: list[tuple[int, int, int]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=gen).relu() + 0.01 for c, h, w in shapes]


T_SHAPES = [(4, 8, 8), (6, 4, 4), (8, 2, 2)]
S_SHAPES = [(3, 8, 8), (5, 3, 3)]


def channels(shapes: list[tuple[int, int, int]]) -> list[int]:
    return [c for c, _, _ in shapes]


# ------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("training", [True, False])
def test_attention_rows_are_distributions(training: bool) -> None:
    attention = AttentionModule([4, 6, 8], [3, 5], dim=16).train(training)
    t_gaps = [torch.randn(5, c) for c in (4, 6, 8)]
    s_gaps = [torch.randn(5, c) for c in (3, 5)]
    a = attention(t_gaps, s_gaps)
    assert a.shape == (5, 3, 2) and a.dtype == torch.float32
    assert torch.all(a > 0) and torch.all(a < 1)
    torch.testing.assert_close(a.sum(dim=2), torch.ones(5, 3))


def test_attention_logits_follow_the_formula() -> None:
    """With BN in eval mode at its initial stats (identity), recompute A by hand."""
    torch.manual_seed(0)
    dim, n, m, batch = 8, 2, 3, 4
    attention = AttentionModule([5, 7], [2, 3, 4], dim=dim).eval()
    t_gaps = [torch.randn(batch, c) for c in (5, 7)]
    s_gaps = [torch.randn(batch, c) for c in (2, 3, 4)]
    scale = 1.0 / (1.0 + 1e-5) ** 0.5  # eval BN with running mean 0, var 1
    q = [scale * attention.query[i][0](t_gaps[i]) for i in range(n)]
    k = [torch.relu(scale * attention.key[j][0](s_gaps[j])) for j in range(m)]
    bilinear = attention.bilinear[0]
    want = torch.empty(batch, n, m)
    for j in range(m):
        wk = (scale * bilinear(k[j])).view(batch, n, dim)
        for i in range(n):
            embedding = attention.p_t[i] @ attention.p_s[j]
            want[:, i, j] = ((wk[:, i] * q[i]).sum(-1) + embedding) / dim**0.5
    torch.testing.assert_close(attention(t_gaps, s_gaps), want.softmax(dim=2))


def test_attention_rejects_wrong_channels() -> None:
    attention = AttentionModule([4], [3, 5], dim=8)
    with pytest.raises(ValueError, match="student taps have channels"):
        attention([torch.randn(2, 4)], [torch.randn(2, 3), torch.randn(2, 6)])


# --------------------------------------------------------------------------- feature loss


def test_identical_tap_gives_zero_distance() -> None:
    t_feats = random_taps(3, T_SHAPES, seed=0)
    s_feats = [random_taps(3, [S_SHAPES[0]], seed=1)[0], t_feats[1].clone()]  # same 6@4x4
    fd = FeatureDistillation([4, 6, 8], [3, 6], dim=8, backend="eager")
    attn, d = fd.attention_and_distances(t_feats, s_feats)
    assert d.shape == attn.shape == (3, 3, 2)
    assert torch.all(d[:, 1, 1].abs() < 1e-7)
    others = torch.ones(3, 2, dtype=torch.bool)
    others[1, 1] = False
    assert torch.all(d[:, others] > 1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_batch_permutation_permutes_attention_and_distances(training: bool) -> None:
    fd = FeatureDistillation(channels(T_SHAPES), channels(S_SHAPES), dim=8, backend="eager")
    fd.train(training)
    t_feats, s_feats = random_taps(6, T_SHAPES, 2), random_taps(6, S_SHAPES, 3)
    attn, d = fd.attention_and_distances(t_feats, s_feats)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    attn_p, d_p = fd.attention_and_distances([t[perm] for t in t_feats], [s[perm] for s in s_feats])
    torch.testing.assert_close(attn_p, attn[perm])
    torch.testing.assert_close(d_p, d[perm])
    assert not torch.allclose(attn[0], attn[1])  # per-sample, not one row for the batch


def test_loss_gradients_reach_student_and_attention_not_teacher() -> None:
    fd = FeatureDistillation(channels(T_SHAPES), channels(S_SHAPES), dim=8, backend="eager")
    t_feats = [t.requires_grad_() for t in random_taps(4, T_SHAPES, 4)]
    s_feats = [s.requires_grad_() for s in random_taps(4, S_SHAPES, 5)]
    value = fd(t_feats, s_feats)
    assert value.dim() == 0
    attn, d = fd.attention_and_distances(t_feats, s_feats)
    torch.testing.assert_close(value, (attn * d).sum((1, 2)).mean())
    value.backward()
    assert all(t.grad is None for t in t_feats)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in s_feats)
    assert fd.attention.p_s.grad is not None and fd.attention.p_s.grad.abs().sum() > 0
    assert fd.attention.query[0][0].weight.grad.abs().sum() > 0


def test_feature_loss_decreases_when_student_is_trained() -> None:
    torch.manual_seed(0)
    teacher = TapNet((6, 8, 12)).eval()
    student = TapNet((4, 6))
    fd = FeatureDistillation([6, 8, 12], [4, 6], dim=16, backend="eager")
    x = torch.rand(32, 3, 12, 12)
    with torch.no_grad():
        _, t_feats = teacher(x, features=True)
    opt = torch.optim.Adam([*student.parameters(), *fd.parameters()], lr=1e-2)

    def evaluate() -> tuple[float, float]:
        """(the loss, the mean over teacher taps of the distance to the closest student tap)"""
        _, s_feats = student(x, features=True)
        attn, d = fd.attention_and_distances(t_feats, s_feats)
        return reference.weighted_sum(d, attn).item(), d.min(dim=2).values.mean().item()

    with torch.no_grad():
        first_loss, first_best_d = evaluate()
    for _ in range(150):
        _, s_feats = student(x, features=True)
        value = fd(t_feats, s_feats)
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():
        last_loss, last_best_d = evaluate()
    assert last_loss < 0.3 * first_loss
    # the student's maps themselves moved toward the teacher's, not only the attention
    assert last_best_d < 0.5 * first_best_d


def test_feature_loss_under_bf16_autocast_matches_fp32() -> None:
    fd = FeatureDistillation(channels(T_SHAPES), channels(S_SHAPES), dim=8, backend="eager")
    t_feats, s_feats = random_taps(4, T_SHAPES, 10), random_taps(4, S_SHAPES, 11)
    want = fd(t_feats, s_feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fd([t.bfloat16() for t in t_feats], [s.bfloat16() for s in s_feats])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)  # only the taps were rounded


def test_one_ibd_training_step_end_to_end() -> None:
    """Teacher taps under no_grad, KL-PGD on the student, IBD loss, one backward."""
    torch.manual_seed(0)
    teacher, student = TapNet((6, 8, 12)).eval(), TapNet((4, 6, 8, 8))
    fd = FeatureDistillation([6, 8, 12], [4, 6, 8, 8], dim=8, backend="eager")
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        t_logits, t_feats = teacher(x, features=True)
    t_probs = loss.soft_labels(t_logits)
    x_adv = attacks.kl_pgd(student, x, t_probs, steps=2)
    s_nat = student(x)
    s_adv, s_feats = student(x_adv, features=True)
    out = loss.ibd_loss(s_nat, s_adv, t_probs, fd(t_feats, s_feats))
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in [*student.parameters(), *fd.parameters()])
    want = 0.1 * out.parts["kl_nat"] + 0.9 * out.parts["kl_adv"] + 0.8 * out.parts["feat"]
    torch.testing.assert_close(out.parts["total"], want)


# ------------------------------------------------------------------------ backend switch


def fake_fused_module(calls: list[str]) -> types.ModuleType:
    """A stand-in for kernels.fused that records calls and delegates to the reference."""
    fake = types.ModuleType("kernels.fused")

    def recording(name: str):
        def op(*args):
            calls.append(name)
            return getattr(reference, name)(*args)

        return op

    for name in ("feature_terms", "weighted_sum"):
        setattr(fake, name, recording(name))
    return fake


def test_fused_backend_dispatches_to_kernels_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "kernels.fused", fake_fused_module(calls))
    torch.manual_seed(0)
    eager = FeatureDistillation(channels(T_SHAPES), channels(S_SHAPES), dim=8, backend="eager")
    fused = FeatureDistillation(channels(T_SHAPES), channels(S_SHAPES), dim=8, backend="fused")
    fused.load_state_dict(eager.state_dict())
    t_feats, s_feats = random_taps(3, T_SHAPES, 6), random_taps(3, S_SHAPES, 7)
    want = eager(t_feats, s_feats)
    assert calls == []
    got = fused(t_feats, s_feats)
    assert calls.count("feature_terms") == 1  # one call for all taps of both sides
    assert calls.count("weighted_sum") == 1
    torch.testing.assert_close(got, want)
    # the chosen kernels survive a deep copy (EMA copies, checkpoint round trips)
    torch.testing.assert_close(copy.deepcopy(fused)(t_feats, s_feats), want)
    assert calls.count("weighted_sum") == 2


def test_auto_backend_on_cpu_is_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "kernels.fused", fake_fused_module(calls))
    fd = FeatureDistillation(channels(T_SHAPES), channels(S_SHAPES), dim=8, backend="auto")
    fd(random_taps(2, T_SHAPES, 8), random_taps(2, S_SHAPES, 9))
    assert calls == []
    assert loss.kernel_backend("auto", "cpu").feature_terms is reference.feature_terms
    assert loss.kernel_backend("fused", "cpu").feature_terms is \
        sys.modules["kernels.fused"].feature_terms


def test_auto_backend_with_cuda_is_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "kernels.fused", fake_fused_module(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fd = FeatureDistillation(channels(T_SHAPES), channels(S_SHAPES), dim=8, backend="auto")
    # CPU tensors named
    assert loss.kernel_backend("auto", "cpu").feature_terms is reference.feature_terms
    fd(random_taps(2, T_SHAPES, 8), random_taps(2, S_SHAPES, 9))  # the fake runs on CPU
    assert "feature_terms" in calls
    monkeypatch.setitem(sys.modules, "kernels.fused", None)
    with pytest.warns(UserWarning, match="falls back to the eager kernels"):
        fd = FeatureDistillation([4], [3], backend="auto")
    assert fd.kernels.feature_terms is reference.feature_terms


def test_missing_fused_kernels_raise_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kernels.fused", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="fused kernels are not available"):
        FeatureDistillation([4], [3], backend="fused")
    with pytest.raises(RuntimeError, match="fused kernels are not available"):
        loss.kernel_backend("fused")


def test_incomplete_fused_module_and_unknown_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kernels.fused", types.ModuleType("kernels.fused"))
    with pytest.raises(RuntimeError, match="does not provide"):
        loss.kernel_backend("fused")
    with pytest.raises(ValueError, match="unknown feature-loss backend"):
        FeatureDistillation([4], [3], backend="triton")


# ---------------------------------------------------------------------- soft-label terms


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    """An fp32 result against its float64 hand computation."""
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def kl_by_hand(student_logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """mean over the batch of sum_k p_k (log p_k - log q_k), q = softmax(student)."""
    q = torch.exp(student_logits.double()) / torch.exp(student_logits.double()).sum(1, True)
    p = p.double()
    return (p * (p.log() - q.log())).sum(1).mean()


def test_soft_label_kl_matches_definition_and_temperature() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    p = loss.soft_labels(t)
    torch.testing.assert_close(p, torch.softmax(t, 1))
    assert_matches(loss.soft_label_kl(s, p), kl_by_hand(s, p))
    p4 = loss.soft_labels(t, temperature=4.0)
    want = 16.0 * kl_by_hand(s / 4.0, p4)
    assert_matches(loss.soft_label_kl(s, p4, temperature=4.0), want)
    # zero when the student's distribution equals the teacher's (logits up to a constant)
    assert loss.soft_label_kl(t + 3.0, p).abs().item() < 1e-6


def test_ibd_loss_with_beta_zero_is_rslad() -> None:
    torch.manual_seed(1)
    s_nat, s_adv, p = torch.randn(4, 10), torch.randn(4, 10), torch.softmax(torch.randn(4, 10), 1)
    want = 0.1 * kl_by_hand(s_nat, p) + 0.9 * kl_by_hand(s_adv, p)
    out = loss.ibd_loss(s_nat, s_adv, p, torch.tensor(123.0), beta=0.0)
    assert_matches(out.total, want)
    torch.testing.assert_close(loss.ibd_loss(s_nat, s_adv, p, None, beta=0.0).total, out.total)
    rslad = loss.rslad_loss(s_nat, s_adv, p)  # RSLAD's weights and its mean over B*K entries
    want_rslad = (kl_by_hand(s_nat, p) / 6 + 5 * kl_by_hand(s_adv, p) / 6) / 10
    assert_matches(rslad.total, want_rslad)
    assert_matches(loss.rslad_loss(s_nat, s_adv, p, scale=10.0).total, 10 * want_rslad)


def test_ibd_loss_combines_parts() -> None:
    torch.manual_seed(2)
    s_nat, s_adv, p = torch.randn(4, 10), torch.randn(4, 10), torch.softmax(torch.randn(4, 10), 1)
    feat = torch.tensor(0.37, requires_grad=True)
    out = loss.ibd_loss(s_nat, s_adv, p, feat)  # defaults alpha 0.9, beta 0.8
    want = 0.1 * kl_by_hand(s_nat, p) + 0.9 * kl_by_hand(s_adv, p) + 0.8 * 0.37
    assert_matches(out.total, want)
    assert set(out.parts) == {"kl_nat", "kl_adv", "feat", "total"}
    assert all(not v.requires_grad for v in out.parts.values())
    out.total.backward()
    assert feat.grad.item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="needs feat_loss"):
        loss.ibd_loss(s_nat, s_adv, p, None)


def test_ibd_loss_with_alpha_zero_ignores_adversarial_logits() -> None:
    torch.manual_seed(3)
    s_nat, p = torch.randn(4, 10), torch.softmax(torch.randn(4, 10), 1)
    s_adv = torch.randn(4, 10, requires_grad=True)
    feat = torch.tensor(0.5)
    out = loss.ibd_loss(s_nat, s_adv, p, feat, alpha=0.0)
    other = loss.ibd_loss(s_nat, 5.0 * torch.randn(4, 10), p, feat, alpha=0.0)
    assert out.total.item() == other.total.item()
    assert_matches(out.total, kl_by_hand(s_nat, p) + 0.8 * 0.5)
    (grad,) = torch.autograd.grad(out.total, s_adv, allow_unused=True, materialize_grads=True)
    assert torch.count_nonzero(grad) == 0


def test_trades_loss_matches_trades_code() -> None:
    torch.manual_seed(4)
    s_nat = torch.randn(5, 10, requires_grad=True)
    s_adv, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    ce = -torch.log_softmax(s_nat.double(), 1)[torch.arange(5), y].mean()
    want = ce + 6.0 * kl_by_hand(s_adv, torch.softmax(s_nat.double(), 1))
    out = loss.trades_loss(s_nat, s_adv, y)
    assert_matches(out.total, want)
    # the KL term is differentiated through s_nat too (not detached, as in TRADES)
    (g_total,) = torch.autograd.grad(out.total, s_nat)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(s_nat, y), s_nat)
    assert not torch.allclose(g_total, g_ce)


def test_pgd_at_and_kd_losses() -> None:
    torch.manual_seed(5)
    s, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    ce = -torch.log_softmax(s.double(), 1)[torch.arange(5), y].mean()
    assert_matches(loss.pgd_at_loss(s, y).total, ce)
    p = torch.softmax(torch.randn(5, 10), 1)
    assert_matches(loss.kd_loss(s, p).total, kl_by_hand(s, p))
    mixed = loss.kd_loss(s, p, y, ce_weight=0.25).total
    assert_matches(mixed, 0.75 * kl_by_hand(s, p) + 0.25 * ce)
    with pytest.raises(ValueError, match="needs labels"):
        loss.kd_loss(s, p, ce_weight=0.5)

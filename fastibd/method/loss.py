"""The IBD objective (Eq. 16 of Kuang et al. 2023) and the baselines built from its parts.

    L = (1 - alpha) * KL(s_nat || t) + alpha * KL(s_adv || t) + beta * feat_loss

`t` is the robust teacher's soft label on clean inputs; `feat_loss` is the attention-weighted
feature distillation of Eq. 12–14 (docs/method.md), whose hot path runs on a kernel backend:
`kernels.reference` (eager, the specification) or `kernels.fused` (Triton, when present).

KL direction and scale: IBD's and TRADES's soft-label terms are what their code computes,
`F.kl_div(log_softmax(student), target_probs, reduction="batchmean")`, i.e.
mean_b sum_k p_target * (log p_target - log p_student). RSLAD's code averages the same
elementwise KL over all B*K entries instead (`torch.mean`), 1/K of that: `rslad_loss` keeps
RSLAD's scale, which its alpha of 5/6 and learning rate were tuned with.
tests/test_against_original.py checks these against ports of the original code.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("eager", "fused", "auto")
FUSED_MODULE = "kernels.fused"
KERNEL_OPS = ("feature_terms", "weighted_sum")


# --------------------------------------------------------------------------- kernel backends


@dataclass(frozen=True)
class KernelOps:
    """The two ops of the feature-distillation hot path (signatures of kernels/reference.py):
    `feature_terms` takes every tap of both sides at once (pools, GAPs and pair distances),
    `weighted_sum` the attention-weighted sum of the distances.

    Plain functions rather than the module object, so a FeatureDistillation holding them
    can still be deep-copied or pickled."""

    feature_terms: Callable[[Sequence[Tensor], Sequence[Tensor]], tuple[Tensor, Tensor, Tensor]]
    weighted_sum: Callable[[Tensor, Tensor], Tensor]

    @classmethod
    def from_module(cls, module: object) -> KernelOps:
        missing = [op for op in KERNEL_OPS if not callable(getattr(module, op, None))]
        if missing:
            name = getattr(module, "__name__", module)
            raise RuntimeError(f"{name} does not provide the kernel ops {missing}")
        return cls(*(getattr(module, op) for op in KERNEL_OPS))


def _fused_backend() -> KernelOps:
    try:
        module = importlib.import_module(FUSED_MODULE)
    except ImportError as err:
        raise RuntimeError(
            f"backend='fused' was asked for, but the fused kernels are not available on this "
            f"build ({FUSED_MODULE} could not be imported: {err}); use backend='eager' or 'auto'"
        ) from err
    return KernelOps.from_module(module)


def kernel_backend(name: str, device: torch.device | str | None = None) -> KernelOps:
    """The kernel ops for `name`: "eager" = kernels.reference; "fused" = kernels.fused
    (RuntimeError when this build has none); "auto" = fused when the target device is CUDA,
    CUDA is available and the fused kernels import, else eager. The target device is
    `device`, or CUDA-if-available when None (the fused ops route CPU tensors to the
    reference themselves)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown feature-loss backend {name!r}; choose one of {BACKENDS}")
    if name == "fused":
        return _fused_backend()
    if name == "auto" and torch.cuda.is_available():
        if device is None or torch.device(device).type == "cuda":
            try:
                return _fused_backend()
            except RuntimeError as err:  # say so: eager on a GPU is much slower
                warnings.warn(f"feature loss falls back to the eager kernels: {err}", stacklevel=2)
    from kernels import reference

    return KernelOps.from_module(reference)


# --------------------------------------------------------------------- attention (Eq. 12–13)


class AttentionModule(nn.Module):
    """Attention over student taps for every teacher tap (Eq. 12–13, as the AFD code).

    Built from the channel counts of the n teacher taps and m student taps. Takes the GAP
    vectors of the taps (the `gap` output of `pool`) and returns A: [B, n, m], softmax over
    the m student taps:

        q_i = BN(Linear(gap_t[i]))                      [B, d]   (no ReLU)
        k_j = ReLU(BN(Linear(gap_s[j])))                [B, d]
        W k_j = BN(Linear_{d -> d*n}(k_j)), viewed as [B, n, d]: one vector per teacher slot i
        logits[b,i,j] = (<(W k_j)[i], q_i> + p_t[i] . p_s[j]) / sqrt(d)
        A = softmax_j(logits)

    p_t [n, d] and p_s [m, d] are learned layer embeddings (xavier_normal init). The BNs run
    in training mode with the student, so a training batch needs B > 1.
    """

    def __init__(
        self, teacher_channels: Sequence[int], student_channels: Sequence[int], dim: int = 128
    ) -> None:
        super().__init__()
        if not teacher_channels or not student_channels:
            raise ValueError("AttentionModule needs at least one teacher and one student tap")
        self.teacher_channels = tuple(int(c) for c in teacher_channels)
        self.student_channels = tuple(int(c) for c in student_channels)
        self.dim = dim
        n = len(self.teacher_channels)
        self.query = nn.ModuleList(
            nn.Sequential(nn.Linear(c, dim), nn.BatchNorm1d(dim)) for c in self.teacher_channels
        )
        self.key = nn.ModuleList(
            nn.Sequential(nn.Linear(c, dim), nn.BatchNorm1d(dim), nn.ReLU())
            for c in self.student_channels
        )
        self.bilinear = nn.Sequential(nn.Linear(dim, dim * n), nn.BatchNorm1d(dim * n))
        self.p_t = nn.Parameter(torch.empty(n, dim))
        self.p_s = nn.Parameter(torch.empty(len(self.student_channels), dim))
        nn.init.xavier_normal_(self.p_t)
        nn.init.xavier_normal_(self.p_s)

    def forward(self, t_gaps: Sequence[Tensor], s_gaps: Sequence[Tensor]) -> Tensor:
        """t_gaps: n tensors [B, Ct_i]; s_gaps: m tensors [B, Cs_j]. Returns A [B, n, m]."""
        n, m = len(self.teacher_channels), len(self.student_channels)
        _check_channels("teacher", [g.shape[-1] for g in t_gaps], self.teacher_channels)
        _check_channels("student", [g.shape[-1] for g in s_gaps], self.student_channels)
        # Tiny matmuls whose softmax decides every pair's weight: keep them in the parameters'
        # precision even when the caller runs the networks under autocast.
        with torch.autocast(t_gaps[0].device.type, enabled=False):
            dtype = self.p_t.dtype
            q = torch.stack([f(g.to(dtype)) for f, g in zip(self.query, t_gaps, strict=True)], 1)
            k = torch.stack([f(g.to(dtype)) for f, g in zip(self.key, s_gaps, strict=True)], 1)
            batch = k.shape[0]
            wk = self.bilinear(k.reshape(batch * m, self.dim)).view(batch, m, n, self.dim)
            # As AFD.py: the layer-embedding term is inside the 1/sqrt(d) with the bilinear one.
            logits = (torch.einsum("bjid,bid->bij", wk, q) + self.p_t @ self.p_s.t()) \
                / math.sqrt(self.dim)
            return logits.softmax(dim=2)


def _check_channels(who: str, got: Sequence[int], expected: Sequence[int]) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"{who} taps have channels {tuple(got)}, but the feature loss was built for "
            f"{tuple(expected)} (check the model and its `features=True` taps)"
        )


# ------------------------------------------------------------------ feature loss (Eq. 14)


class FeatureDistillation(nn.Module):
    """feat_loss = mean_b sum_ij A[b,i,j] d[b,i,j] from teacher taps and student taps.

    Owns the AttentionModule, whose parameters train with the student. `backend` picks the
    kernels for feature_terms (pools, pair distances) and weighted_sum (see `kernel_backend`).
    """

    def __init__(
        self,
        teacher_channels: Sequence[int],
        student_channels: Sequence[int],
        dim: int = 128,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.attention = AttentionModule(teacher_channels, student_channels, dim)
        self.backend = backend
        # Resolved once, here: a missing fused build fails at construction, and forward
        # holds no import logic for torch.compile to trace.
        self.kernels = kernel_backend(backend)

    def attention_and_distances(
        self, t_feats: Sequence[Tensor], s_feats: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """A [B, n, m] and d [B, n, m] for teacher taps [B, Ct_i, Ht_i, Wt_i] (n of them)
        and student taps [B, Cs_j, Hs_j, Ws_j] (m of them)."""
        # One call for all taps (the fused ops' unit: a fixed number of launches). The teacher
        # is frozen: the op never builds (or runs) a backward into it.
        t_gaps, s_gaps, d = self.kernels.feature_terms(t_feats, s_feats)
        attn = self.attention(t_gaps.split([z.shape[1] for z in t_feats], dim=1),
                              s_gaps.split([z.shape[1] for z in s_feats], dim=1))
        return attn, d

    def forward(self, t_feats: Sequence[Tensor], s_feats: Sequence[Tensor]) -> Tensor:
        """Scalar feature loss (fp32)."""
        attn, d = self.attention_and_distances(t_feats, s_feats)
        return self.kernels.weighted_sum(d, attn)


# ------------------------------------------------------------------------ soft-label terms


def _upcast(t: Tensor) -> Tensor:
    """fp32 for the low-precision dtypes autocast produces; float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def soft_labels(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Teacher soft label [B, K] = softmax(teacher_logits / T), in fp32 (float64 stays),
    detached."""
    return F.softmax(_upcast(teacher_logits.detach()) / temperature, dim=1)


def soft_label_kl(
    student_logits: Tensor, teacher_probs: Tensor, temperature: float = 1.0
) -> Tensor:
    """KL(teacher || student) as the RSLAD / IBD code: kl_div(log_softmax(s / T), p, batchmean).

    student_logits: [B, K]; teacher_probs: [B, K] (rows sum to 1, already softened with the
    same T, see `soft_labels`). When T != 1 the result is multiplied by T^2 (Hinton et al.),
    so gradient magnitudes do not shrink as 1/T^2; at T = 1 it is exactly the code's value.
    Computed in fp32.
    """
    log_p = F.log_softmax(_upcast(student_logits) / temperature, dim=1)
    kl = F.kl_div(log_p, _upcast(teacher_probs), reduction="batchmean")
    return kl * temperature**2 if temperature != 1.0 else kl


# ---------------------------------------------------------------------------- objectives


@dataclass
class LossOutput:
    """`total` carries the graph; `parts` are detached scalars for logging (tensors, not
    floats, so logging every step does not force a device sync)."""

    total: Tensor
    parts: dict[str, Tensor]


def _output(total: Tensor, **parts: Tensor) -> LossOutput:
    logged = {name: value.detach() for name, value in parts.items()}
    logged["total"] = total.detach()
    return LossOutput(total, logged)


def ibd_loss(
    s_nat: Tensor,
    s_adv: Tensor,
    teacher_probs: Tensor,
    feat_loss: Tensor | None = None,
    *,
    alpha: float = 0.9,
    beta: float = 0.8,
    temperature: float = 1.0,
) -> LossOutput:
    """IBD (Eq. 16): (1-alpha) KL(s_nat, t) + alpha KL(s_adv, t) + beta feat_loss.

    s_nat, s_adv: student logits [B, K] on clean and adversarial inputs; teacher_probs [B, K]
    the teacher's soft label on clean inputs; feat_loss: the scalar from FeatureDistillation
    (may be None only when beta == 0). Parts: kl_nat, kl_adv, feat (if given), total.
    """
    kl_nat = soft_label_kl(s_nat, teacher_probs, temperature)
    kl_adv = soft_label_kl(s_adv, teacher_probs, temperature)
    total = (1.0 - alpha) * kl_nat + alpha * kl_adv
    parts = {"kl_nat": kl_nat, "kl_adv": kl_adv}
    if feat_loss is not None:
        parts["feat"] = feat_loss
        if beta != 0.0:
            total = total + beta * _upcast(feat_loss)
    elif beta != 0.0:
        raise ValueError(f"ibd_loss with beta={beta} needs feat_loss (pass beta=0 for RSLAD)")
    return _output(total, **parts)


def rslad_loss(
    s_nat: Tensor, s_adv: Tensor, teacher_probs: Tensor, *, alpha: float = 5.0 / 6.0,
    scale: float = 1.0,
) -> LossOutput:
    """RSLAD (Zi et al. 2021), as its code computes it:
    scale * [(1 - alpha) mean(KL_elem(s_nat, t)) + alpha mean(KL_elem(s_adv, t))], where
    KL_elem is the [B, K] elementwise KL and the mean runs over all B*K entries (1/K of IBD's
    batch-mean). alpha defaults to RSLAD's 5/6. RSLAD's CIFAR-100 scripts multiply by 10
    "to keep consistent with CIFAR-10" (scale=10). RSLAD writes log(p_t + 1e-5) inside its
    KL: that shifts the value by at most ~1e-5 and leaves every gradient unchanged."""
    def mean_kl(logits: Tensor) -> Tensor:
        log_p = F.log_softmax(_upcast(logits), dim=1)
        return F.kl_div(log_p, _upcast(teacher_probs), reduction="sum") / log_p.numel()

    kl_nat, kl_adv = scale * mean_kl(s_nat), scale * mean_kl(s_adv)
    return _output((1.0 - alpha) * kl_nat + alpha * kl_adv, kl_nat=kl_nat, kl_adv=kl_adv)


def kd_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    labels: Tensor | None = None,
    *,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
) -> LossOutput:
    """Plain knowledge distillation on clean inputs:
    (1 - ce_weight) * T^2 KL(student/T, teacher) + ce_weight * CE(student, labels)."""
    kl = soft_label_kl(student_logits, teacher_probs, temperature)
    if ce_weight == 0.0:
        return _output(kl, kl=kl)
    if labels is None:
        raise ValueError(f"kd_loss with ce_weight={ce_weight} needs labels")
    ce = F.cross_entropy(_upcast(student_logits), labels)
    return _output((1.0 - ce_weight) * kl + ce_weight * ce, kl=kl, ce=ce)


def trades_loss(s_nat: Tensor, s_adv: Tensor, labels: Tensor, *, beta: float = 6.0) -> LossOutput:
    """TRADES (Zhang et al. 2019): CE(s_nat, y) + beta * kl_div(log_softmax(s_adv),
    softmax(s_nat), batchmean). As in the TRADES code, s_nat is *not* detached inside the
    KL term: the robustness term also pulls the clean output toward the adversarial one."""
    ce = F.cross_entropy(_upcast(s_nat), labels)
    kl = F.kl_div(F.log_softmax(_upcast(s_adv), dim=1), F.softmax(_upcast(s_nat), dim=1),
                  reduction="batchmean")
    return _output(ce + beta * kl, ce=ce, kl=kl)


def pgd_at_loss(s_adv: Tensor, labels: Tensor) -> LossOutput:
    """PGD adversarial training (Madry et al. 2018): cross-entropy on adversarial logits."""
    ce = F.cross_entropy(_upcast(s_adv), labels)
    return _output(ce, ce=ce)

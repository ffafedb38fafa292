"""The check both kernel test files make: FeatureDistillation with the fused backend against
the eager one, same attention weights, on real taps."""

from __future__ import annotations

import torch
from torch import nn

from fastibd.method.loss import FeatureDistillation


def assert_fused_matches_eager(t_taps: list[torch.Tensor], s_taps: list[torch.Tensor],
                               student: nn.Module, loss_tol: dict[str, float],
                               grad_tol: dict[str, float]) -> FeatureDistillation:
    """Loss and gradients (student parameters, attention module) equal within the
    tolerances; a gradient that is None on one side is None on the other. Returns the fused
    head."""
    t_ch, s_ch = [t.shape[1] for t in t_taps], [s.shape[1] for s in s_taps]
    eager = FeatureDistillation(t_ch, s_ch, dim=16, backend="eager")
    fused = FeatureDistillation(t_ch, s_ch, dim=16, backend="fused")
    fused.load_state_dict(eager.state_dict())
    params = list(student.parameters())
    want = eager(t_taps, s_taps)
    want_grads = torch.autograd.grad(want, params + list(eager.parameters()),
                                     retain_graph=True, allow_unused=True)
    got = fused(t_taps, s_taps)
    got_grads = torch.autograd.grad(got, params + list(fused.parameters()), allow_unused=True)
    torch.testing.assert_close(got, want, **loss_tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, **grad_tol)
    return fused

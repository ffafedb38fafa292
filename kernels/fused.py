"""Fused kernels of the feature-distillation hot path: the public facade.

`fastibd.method.loss.kernel_backend("fused")` imports this module and uses its callables,
which have exactly the signatures of kernels/reference.py:

    feature_terms(t_taps, s_taps)   -> (t_gaps, s_gaps, d [B, n, m])  what the loss calls
    weighted_sum(d, attn)           -> scalar                          plain torch (below)

feature_terms composes the two ops, each in one file with its Triton kernels, host functions
and torch.library custom-op wiring (fake functions, autograd), so torch.compile
(fullgraph=True) traces through them:

    pool_taps(taps)                 -> (maps [B, sum H*W], gaps [B, sum C])  kernels/pool.py
    packed_pair_distances(t, s, t_sizes, s_sizes) -> d [B, n, m]       kernels/pairs.py

with the one-map forms `pool(z)` and `pair_distances(t_maps, s_maps)` built on them. On CUDA
(fp32/fp16/bf16) they run the kernels; on any other device or dtype the eager reference.
Everything imports on machines without a GPU or without Triton (kernels.common).

A whole loss forward + backward is a fixed number of launches whatever the number of taps:
one pool launch per side and direction, one GAP reduction per side, three for the pairs.
Called eagerly, feature_terms is one autograd node for all of them, so the host's work per
step (Python, autograd) does not grow with the taps either.

weighted_sum stays the reference's torch expression: it reads two [B, n, m] tensors
(kilobytes), and inside a compiled step Inductor fuses it with its neighbours anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kernels import reference
from kernels.common import eager_triton
from kernels.pairs import packed_pair_distances, pair_distances, pairs_bwd, pairs_fwd
from kernels.pool import PoolPlan, pool, pool_bwd, pool_fwd, pool_plan, pool_taps, tap_signature

__all__ = ["feature_terms", "weighted_sum", "pool_taps", "packed_pair_distances", "pool",
           "pair_distances"]

weighted_sum = reference.weighted_sum


# (teacher taps, device, every tap's signature) -> both sides' pool plans; see _node_plans
_NODE_PLANS: dict[tuple, tuple[PoolPlan, PoolPlan]] = {}


def _node_plans(n_teacher: int, taps: Sequence[Tensor]) -> tuple[PoolPlan, PoolPlan]:
    """The teacher's and the student's pool plans in one lookup (pool_plan per side would be
    two, plus the check every call). A new key is checked first; the check reads only the
    counts, ranks and batch sizes that the key fixes."""
    key = (n_teacher, taps[0].device, tap_signature(taps))
    plans = _NODE_PLANS.get(key)
    if plans is None:
        t_taps, s_taps = taps[:n_teacher], taps[n_teacher:]
        reference.check_feature_taps(t_taps, s_taps)
        if len(_NODE_PLANS) >= 64:  # shapes seen by one run: a handful (train, eval, last batch)
            _NODE_PLANS.clear()
        plans = _NODE_PLANS[key] = (pool_plan(t_taps), pool_plan(s_taps))
    return plans


class _EagerFeatureTerms(torch.autograd.Function):
    """feature_terms on the Triton path as one autograd node (what an eager call runs): both
    pools and the pair distances forward; the pairs' and the student pool's backward in one
    backward. torch.compile traces the custom ops instead (see `feature_terms`)."""

    @staticmethod
    def forward(ctx, n_teacher: int, *taps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t_plan, s_plan = _node_plans(n_teacher, taps)
        t_taps, s_taps = taps[:n_teacher], taps[n_teacher:]
        t_maps, t_gaps = pool_fwd(t_taps, plan=t_plan)
        s_maps, s_gaps = pool_fwd(s_taps, plan=s_plan)
        d, stats = pairs_fwd(t_maps, s_maps, t_plan.sizes, s_plan.sizes)
        ctx.save_for_backward(t_maps, s_maps, stats, *s_taps)
        ctx.plans = (t_plan, s_plan)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(t_gaps)  # the teacher is a constant
        return t_gaps, s_gaps, d

    @staticmethod
    def backward(ctx, _g_t_gaps: Tensor | None, g_s_gaps: Tensor | None,
                 g_d: Tensor | None) -> tuple[Tensor | None, ...]:
        # Runs only when a student tap asks for a gradient (the teacher's never do: detached
        # by feature_terms) and d or s_gaps reached the loss (t_gaps cannot).
        t_maps, s_maps, stats, *s_taps = ctx.saved_tensors
        t_plan, s_plan = ctx.plans
        needed = ctx.needs_input_grad[1 + len(t_plan.sizes):]
        g_s_maps = None
        if g_d is not None:
            _, g_s_maps = pairs_bwd(g_d, t_maps, s_maps, t_plan.sizes, s_plan.sizes, stats,
                                    False, True)
        dzs = pool_bwd(s_taps, g_s_maps, g_s_gaps, plan=s_plan)
        return (None, *[None] * len(t_plan.sizes),
                *[dz if need else None for dz, need in zip(dzs, needed, strict=True)])


def feature_terms(t_taps: Sequence[Tensor], s_taps: Sequence[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(t_gaps [B, sum Ct], s_gaps [B, sum Cs], d [B, n, m]) fp32 of teacher and student taps
    [B, C, H, W] (fp32/fp16/bf16, NCHW or channels_last; float64 runs the reference), the
    teacher's a constant; see kernels.reference.feature_terms. Eager on CUDA: one autograd
    node over 8 launches forward + backward. Traced by torch.compile, or off the Triton
    path: pool_taps per side and packed_pair_distances, each dispatching on its own."""
    if eager_triton([*t_taps, *s_taps]):  # the node checks the taps (_node_plans)
        if any(z.requires_grad for z in t_taps):  # a teacher not run under no_grad: do not
            t_taps = [z.detach() for z in t_taps]  # keep its graph alive through this node
        return _EagerFeatureTerms.apply(len(t_taps), *t_taps, *s_taps)
    reference.check_feature_taps(t_taps, s_taps)
    return reference.composed_feature_terms(pool_taps, packed_pair_distances, t_taps, s_taps)

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
from typing import NamedTuple

import torch
from torch import Tensor

from kernels import reference
from kernels.common import poison_enabled, refuse_double_backward, triton_device, use_triton
from kernels.pairs import (
    PairPlan,
    packed_pair_distances,
    pair_distances,
    pair_plan,
    pairs_bwd,
    pairs_fwd,
)
from kernels.pool import PoolPlan, pool, pool_bwd, pool_fwd, pool_plan, pool_taps, tap_signature

__all__ = ["feature_terms", "weighted_sum", "pool_taps", "packed_pair_distances", "pool",
           "pair_distances"]

weighted_sum = reference.weighted_sum


class _NodePlans(NamedTuple):
    """Everything the one-node op launches from, per tap signature (see _node_plans)."""

    t: PoolPlan
    s: PoolPlan
    pairs: PairPlan


# (teacher taps, device, every tap's signature) -> the node's plans; see _node_plans
_NODE_PLANS: dict[tuple, _NodePlans] = {}


def _node_plans(t_taps: Sequence[Tensor], s_taps: Sequence[Tensor]) -> _NodePlans | None:
    """The plans of both pools and the pairs in one lookup, or None off the Triton path
    (another device or dtype: the reference runs, and checks the taps). One walk over the
    taps per call (the signature); the dispatch rule's dtype check and the reference's tap
    check run only for a new signature, which the key fixes: counts, ranks, batch sizes,
    dtypes."""
    taps = [*t_taps, *s_taps]
    if not taps or not triton_device(taps[0].device):
        return None
    key = (len(t_taps), taps[0].device, tap_signature(taps))
    plans = _NODE_PLANS.get(key)
    if plans is None:
        if not use_triton(taps):
            return None
        reference.check_feature_taps(t_taps, s_taps)
        if len(_NODE_PLANS) >= 64:  # shapes seen by one run: a handful (train, eval, last batch)
            _NODE_PLANS.clear()
        t_plan, s_plan = pool_plan(t_taps), pool_plan(s_taps)
        plans = _NODE_PLANS[key] = _NodePlans(
            t_plan, s_plan, pair_plan(t_plan.sizes, s_plan.sizes, taps[0].device))
    return plans


class _EagerFeatureTerms(torch.autograd.Function):
    """feature_terms on the Triton path as one autograd node (what an eager call runs): both
    pools and the pair distances forward; the pairs' and the student pool's backward in one
    backward. The teacher's taps come in a tuple, which autograd does not look into: the node
    has no edge into the teacher's graph (a constant, as detached). torch.compile traces the
    custom ops instead (see `feature_terms`)."""

    @staticmethod
    def forward(ctx, plans: _NodePlans, t_taps: tuple[Tensor, ...], *s_taps: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        poison = poison_enabled()  # once (an environment read costs ~1.5 us)
        t_maps, t_gaps = pool_fwd(t_taps, plan=plans.t, poison=poison)
        s_maps, s_gaps = pool_fwd(s_taps, plan=plans.s, poison=poison)
        d, stats = pairs_fwd(t_maps, s_maps, plans.t.sizes, plans.s.sizes, plan=plans.pairs,
                             poison=poison)
        ctx.save_for_backward(t_maps, s_maps, stats, *s_taps)
        ctx.plans = plans
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(t_gaps)  # the teacher is a constant
        return t_gaps, s_gaps, d

    @staticmethod
    def backward(ctx, _g_t_gaps: Tensor | None, g_s_gaps: Tensor | None,
                 g_d: Tensor | None) -> tuple[Tensor | None, ...]:
        refuse_double_backward("feature_terms")
        # Runs only when a student tap asks for a gradient and d or s_gaps reached the loss
        # (t_gaps cannot).
        t_maps, s_maps, stats, *s_taps = ctx.saved_tensors
        plans, poison = ctx.plans, poison_enabled()
        g_s_maps = None
        if g_d is not None:
            _, g_s_maps = pairs_bwd(g_d, t_maps, s_maps, plans.t.sizes, plans.s.sizes, stats,
                                    False, True, plan=plans.pairs, poison=poison)
        dzs = pool_bwd(s_taps, g_s_maps, g_s_gaps, plan=plans.s, poison=poison)
        return (None, None, *[dz if need else None
                              for dz, need in zip(dzs, ctx.needs_input_grad[2:], strict=True)])


def feature_terms(t_taps: Sequence[Tensor], s_taps: Sequence[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(t_gaps [B, sum Ct], s_gaps [B, sum Cs], d [B, n, m]) fp32 of teacher and student taps
    [B, C, H, W] (fp32/fp16/bf16, NCHW or channels_last; float64 runs the reference), the
    teacher's a constant; see kernels.reference.feature_terms. Eager on CUDA: one autograd
    node over 8 launches forward + backward. Traced by torch.compile, or off the Triton
    path: pool_taps per side and packed_pair_distances, each dispatching on its own."""
    if not torch.compiler.is_compiling():  # dynamo traces the custom ops below instead
        plans = _node_plans(t_taps, s_taps)
        if plans is not None:
            return _EagerFeatureTerms.apply(plans, tuple(t_taps), *s_taps)
    reference.check_feature_taps(t_taps, s_taps)
    return reference.composed_feature_terms(pool_taps, packed_pair_distances, t_taps, s_taps)

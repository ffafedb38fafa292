"""Fused kernels of the feature-distillation hot path: the public facade.

`fastibd.method.loss.kernel_backend("fused")` imports this module and uses its three callables,
which have exactly the signatures of kernels/reference.py:

    pool(z)                    -> (map [B, H, W], gap [B, C])        fastibd::pool
    pair_distances(t, s)       -> d [B, n, m]                        fastibd::pair_distances
    weighted_sum(d, attn)      -> scalar                             plain torch (below)

On CUDA (fp32/fp16/bf16) they run Triton kernels (kernels/pool.py, kernels/pairs.py); on any
other device or dtype the eager reference. This module imports on machines without a GPU
or without Triton (Triton is only imported when a kernel is about to launch). The ops are
torch.library custom ops (kernels/ops.py) with fake functions and autograd formulas, so
torch.compile(fullgraph=True) traces through them.

weighted_sum stays the reference's torch expression: it reads two [B, n, m] tensors
(kilobytes), and inside a compiled step Inductor fuses it with its neighbours anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kernels import ops, reference

__all__ = ["pool", "pair_distances", "weighted_sum"]


def pool(z: Tensor) -> tuple[Tensor, Tensor]:
    """Channel-pooled energy map and GAP of a feature map, in one pass over z.

    z: [B, C, H, W], NCHW or channels_last, fp32/fp16/bf16 (float64 runs the reference).
    Returns (map [B, H, W] = mean_c z^2, gap [B, C] = mean_hw z), fp32, differentiable."""
    if z.dim() != 4:
        raise ValueError(f"pool expects a [B, C, H, W] feature map, got shape {tuple(z.shape)}")
    channel_map, gap = ops.pool_op(z)
    return channel_map, gap


def pair_distances(t_maps: Sequence[Tensor], s_maps: Sequence[Tensor]) -> Tensor:
    """Distances between every teacher map and every student map (one launch on CUDA).

    t_maps: n maps [B, Ht_i, Wt_i]; s_maps: m maps [B, Hs_j, Ws_j] (any sizes). Returns
    d [B, n, m] fp32 (float64 for float64 maps); see kernels.reference.pair_distances.
    Differentiable w.r.t. both sides (the teacher gradient is only computed when asked)."""
    if len(t_maps) == 0 or len(s_maps) == 0:
        raise ValueError("pair_distances needs at least one teacher map and one student map")
    maps = [*t_maps, *s_maps]
    if any(x.dim() != 3 for x in maps) or len({x.shape[0] for x in maps}) != 1:
        raise ValueError(
            "pair_distances expects [B, H, W] maps with one batch size, got shapes "
            f"{[tuple(x.shape) for x in maps]}"
        )
    d, _stats = ops.pair_distances_op(list(t_maps), list(s_maps))
    return d


weighted_sum = reference.weighted_sum

"""Fused kernels of the feature-distillation hot path: the public facade.

`fastibd.method.loss.kernel_backend("fused")` imports this module and uses its callables,
which have exactly the signatures of kernels/reference.py:

    pool_taps(taps)                 -> (maps [B, sum H*W], gaps [B, sum C])  fastibd::pool_taps
    packed_pair_distances(t, s, t_sizes, s_sizes) -> d [B, n, m]       fastibd::pair_distances
    weighted_sum(d, attn)           -> scalar                          plain torch (below)

and the one-map forms `pool(z)` and `pair_distances(t_maps, s_maps)` built on them. A whole
loss forward + backward is a fixed number of launches whatever the number of taps (one pool
launch per side and direction, one GAP reduction per side, three for the pairs).

Each op lives in one file with its Triton kernels, host functions and torch.library custom-op
wiring (fake functions, autograd), so torch.compile(fullgraph=True) traces through them:
kernels/pool.py and kernels/pairs.py. On CUDA (fp32/fp16/bf16) they run the kernels; on any
other device or dtype the eager reference. Everything imports on machines without a GPU or
without Triton (kernels.common).

weighted_sum stays the reference's torch expression: it reads two [B, n, m] tensors
(kilobytes), and inside a compiled step Inductor fuses it with its neighbours anyway.
"""

from __future__ import annotations

from kernels import reference
from kernels.pairs import packed_pair_distances, pair_distances
from kernels.pool import pool, pool_taps

__all__ = ["pool_taps", "packed_pair_distances", "weighted_sum", "pool", "pair_distances"]

weighted_sum = reference.weighted_sum

"""Eager reference of the feature-distillation hot path (docs/method.md, Eq. 12–14).

This module is the *specification*: the fused kernels must reproduce these functions,
forward and backward (autograd of this code is the reference backward). It is written
for clarity, not speed or memory: inputs are upcast before any arithmetic.

The three ops, composed by `feature_distillation` (one map each):

    pool(z)                    -> (map [B,H,W] = mean_c z^2,  gap [B,C] = mean_hw z)
    pair_distances(t, s)       -> d [B,n,m]  (resize student map j to teacher map i's size,
                                              L2-normalize both, mean squared difference)
    weighted_sum(d, attn)      -> scalar     mean_b sum_ij attn[b,i,j] * d[b,i,j]

the packed forms (one call per side for all taps, the fused kernels' unit):

    pool_taps(taps)            -> (maps [B, sum H*W], gaps [B, sum C]): every tap's pool,
                                  concatenated per sample in tap order
    packed_pair_distances(t, s, t_sizes, s_sizes)
                               -> pair_distances of the maps cut out of the packed rows

and what the loss calls, the two composed for both sides at once (the teacher a constant):

    feature_terms(t_taps, s_taps) -> (t_gaps [B, sum Ct], s_gaps [B, sum Cs], d [B, n, m])

Accumulation dtype: float64 inputs stay float64 (for gradcheck); every other float dtype
(fp16, bf16, fp32) is computed and returned in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

NORMALIZE_EPS = 1e-12  # F.normalize's default: a map's L2 norm is clamped to at least this


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the dtype every op computes in)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def pool(z: Tensor) -> tuple[Tensor, Tensor]:
    """Channel-pooled energy map and global average pool of one feature map.

    z: [B, C, H, W], any memory format (NCHW or channels_last), any float dtype.
    Returns (map, gap):
        map: [B, H, W] = mean over C of z^2   (the attention map of Eq. 14)
        gap: [B, C]    = mean over H, W of z  (the input of the query/key MLPs)
    both in fp32 (float64 for float64 input), accumulated in that dtype.
    """
    if z.dim() != 4:
        raise ValueError(f"pool expects a [B, C, H, W] feature map, got shape {tuple(z.shape)}")
    zf = z.to(accumulation_dtype(z))
    return zf.square().mean(dim=1), zf.mean(dim=(2, 3))


def check_taps(taps: Sequence[Tensor]) -> None:
    """ValueError unless taps is a non-empty list of [B, C, H, W] maps of one batch size,
    each with at least one channel and one position (an empty map has no mean)."""
    shapes = [z.shape for z in taps]  # plain sizes, no slicing: this runs every step
    batch = shapes[0][0] if shapes and len(shapes[0]) == 4 else None
    if batch is None or any(len(shape) != 4 or shape[0] != batch or
                            shape[1] * shape[2] * shape[3] == 0 for shape in shapes):
        raise ValueError("pool expects [B, C, H, W] feature maps with one batch size and "
                         f"C, H, W >= 1, got shapes {[tuple(shape) for shape in shapes]}")


def pool_taps(taps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """pool of every tap, packed: (maps [B, sum H_t W_t], gaps [B, sum C_t]) in tap order."""
    check_taps(taps)
    pooled = [pool(z) for z in taps]
    batch = taps[0].shape[0]
    maps = torch.cat([mp.reshape(batch, -1) for mp, _ in pooled], dim=1)
    return maps, torch.cat([gap for _, gap in pooled], dim=1)


Sizes = Sequence[tuple[int, int]]  # (H, W) of each map in a packed row


def unpack_maps(packed: Tensor, sizes: Sizes) -> list[Tensor]:
    """Views [B, H_i, W_i] of the maps in a packed [B, sum H_i W_i] tensor (no copy)."""
    if packed.dim() != 2 or packed.shape[1] != sum(h * w for h, w in sizes):
        raise ValueError(f"a packed [B, {sum(h * w for h, w in sizes)}] tensor was expected "
                         f"for map sizes {list(sizes)}, got shape {tuple(packed.shape)}")
    chunks = packed.split([h * w for h, w in sizes], dim=1)
    return [x.reshape(packed.shape[0], h, w) for x, (h, w) in zip(chunks, sizes, strict=True)]


def packed_pair_distances(t_packed: Tensor, s_packed: Tensor, t_sizes: Sizes,
                          s_sizes: Sizes) -> Tensor:
    """pair_distances of packed maps (the `maps` of pool_taps) with the given (H, W) sizes."""
    return pair_distances(unpack_maps(t_packed, t_sizes), unpack_maps(s_packed, s_sizes))


def sizes_of(maps: Sequence[Tensor]) -> tuple[tuple[int, int], ...]:
    """(H, W), the last two sizes, of each map [B, H, W] or tap [B, C, H, W]: how a packed
    row holds their maps."""
    return tuple((int(x.shape[-2]), int(x.shape[-1])) for x in maps)


def check_feature_taps(t_taps: Sequence[Tensor], s_taps: Sequence[Tensor]) -> None:
    """ValueError unless both sides have taps, all [B, C, H, W] of one batch size."""
    if not t_taps or not s_taps:
        raise ValueError("the feature loss needs at least one teacher tap and one student "
                         f"tap, got {len(t_taps)} and {len(s_taps)}")
    check_taps([*t_taps, *s_taps])


def feature_terms(t_taps: Sequence[Tensor], s_taps: Sequence[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Everything the feature loss needs from the taps, in one call: (t_gaps [B, sum Ct],
    s_gaps [B, sum Cs], d [B, n, m]) = the GAPs of pool_taps on each side and the
    packed_pair_distances of their maps. The teacher is frozen: its taps are constants (no
    gradient flows into them, nor into t_gaps), as `z.detach()` would make them."""
    check_feature_taps(t_taps, s_taps)
    return composed_feature_terms(pool_taps, packed_pair_distances, t_taps, s_taps)


def composed_feature_terms(pool_op: Callable[[Sequence[Tensor]], tuple[Tensor, Tensor]],
                           pairs_op: Callable[[Tensor, Tensor, Sizes, Sizes], Tensor],
                           t_taps: Sequence[Tensor], s_taps: Sequence[Tensor]
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """feature_terms made of a pool_taps and a packed_pair_distances (this module's, or the
    fused custom ops): the teacher's taps detached, each side pooled, its maps compared."""
    t_maps, t_gaps = pool_op([z.detach() for z in t_taps])
    s_maps, s_gaps = pool_op(s_taps)
    return t_gaps, s_gaps, pairs_op(t_maps, s_maps, sizes_of(t_taps), sizes_of(s_taps))


def normalized_flat(maps: Tensor) -> Tensor:
    """[B, ..., H, W] -> [B, ..., H*W], each sample's flattened map scaled to unit L2 norm
    (F.normalize semantics: divided by max(norm, 1e-12), so an all-zero map stays zero)."""
    return F.normalize(maps.flatten(-2), p=2.0, dim=-1, eps=NORMALIZE_EPS)


def pair_distances(t_maps: Sequence[Tensor], s_maps: Sequence[Tensor]) -> Tensor:
    """Distances between every teacher map and every student map.

    t_maps: n teacher maps, map i is [B, Ht_i, Wt_i] (the `map` output of `pool`).
    s_maps: m student maps, map j is [B, Hs_j, Ws_j]; sizes may be larger or smaller than
            the teacher's (adaptive average pooling then down- or upsamples).
    Returns d: [B, n, m] in fp32 (float64 if any map is float64), where
        v_t      = normalize(flatten(t_maps[i]))
        v_s      = normalize(flatten(adaptive_avg_pool2d(s_maps[j], (Ht_i, Wt_i))))
        d[b,i,j] = mean over the Ht_i*Wt_i positions of (v_t - v_s)^2
    """
    if len(t_maps) == 0 or len(s_maps) == 0:
        raise ValueError("pair_distances needs at least one teacher map and one student map")
    dtype = accumulation_dtype(*t_maps, *s_maps)
    # Student maps resized to each distinct teacher size, computed once per size:
    # ResNet-style nets have only 3–4 distinct tap sizes for 8–16 taps.
    resized: dict[tuple[int, int], Tensor] = {}
    rows = []
    for t_map in t_maps:
        size = (t_map.shape[-2], t_map.shape[-1])
        if size not in resized:
            stacked = [
                F.adaptive_avg_pool2d(s.to(dtype).unsqueeze(1), size).squeeze(1) for s in s_maps
            ]
            resized[size] = normalized_flat(torch.stack(stacked, dim=1))  # [B, m, HW]
        v_s = resized[size]
        v_t = normalized_flat(t_map.to(dtype)).unsqueeze(1)  # [B, 1, HW]
        rows.append((v_t - v_s).square().mean(dim=-1))  # [B, m]
    return torch.stack(rows, dim=1)


def weighted_sum(d: Tensor, attn: Tensor) -> Tensor:
    """Attention-weighted feature loss (Eq. 14): scalar mean_b sum_{i,j} attn[b,i,j] d[b,i,j].

    d, attn: [B, n, m]. Computed in fp32 (float64 if either is float64).
    """
    if d.shape != attn.shape or d.dim() != 3:
        raise ValueError(
            f"weighted_sum expects d and attn of the same [B, n, m] shape, "
            f"got {tuple(d.shape)} and {tuple(attn.shape)}"
        )
    dtype = accumulation_dtype(d, attn)
    # .to only where it converts: a no-op .to still costs a dispatch (~2 us each here, and
    # the fused loss's host side is timed against a budget; docs/benchmarks/kernel_plan.md)
    d, attn = (t if t.dtype == dtype else t.to(dtype) for t in (d, attn))
    # Kept as sum over (i, j), then mean over b: a single sum / B has as many autograd nodes
    # but costs ~0.02 ms less host time (a full reduction and a division instead of a
    # reduction over dims and a mean), and sums in another order; this eager expression is
    # the one the README's demo numbers were measured with.
    return (attn * d).sum(dim=(1, 2)).mean()


def feature_distillation(
    t_feats: Sequence[Tensor], s_feats: Sequence[Tensor], attn: Tensor
) -> Tensor:
    """The whole hot path on raw taps: weighted_sum(pair_distances(maps_t, maps_s), attn).

    t_feats: n teacher taps [B, Ct_i, Ht_i, Wt_i]; s_feats: m student taps [B, Cs_j, Hs_j, Ws_j];
    attn: [B, n, m] (rows usually sum to 1). Returns a scalar.
    """
    t_maps = [pool(z)[0] for z in t_feats]
    s_maps = [pool(z)[0] for z in s_feats]
    return weighted_sum(pair_distances(t_maps, s_maps), attn)

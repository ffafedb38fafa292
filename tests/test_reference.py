"""kernels.reference: the specification of the feature-distillation hot path.

Checked against hand-computed values, against an independent float64 implementation
(explicit loops, einsum, the Gram-product identity) and by gradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from kernels import reference

# ------------------------------------------------------------- independent float64 versions


def pool_einsum(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.double()
    _, c, h, w = z.shape
    return torch.einsum("bchw,bchw->bhw", z, z) / c, torch.einsum("bchw->bc", z) / (h * w)


def adaptive_pool_loops(m: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """[H, W] -> [out_h, out_w]; window r covers rows floor(r*H/out_h) .. ceil((r+1)*H/out_h)."""
    h, w = m.shape
    out = torch.empty(out_h, out_w, dtype=torch.float64)
    for r in range(out_h):
        r0, r1 = (r * h) // out_h, math.ceil((r + 1) * h / out_h)
        for c in range(out_w):
            c0, c1 = (c * w) // out_w, math.ceil((c + 1) * w / out_w)
            out[r, c] = m[r0:r1, c0:c1].double().mean()
    return out


def distances_loops(t_maps: list[torch.Tensor], s_maps: list[torch.Tensor]) -> torch.Tensor:
    """d[b,i,j] via the unit-norm identity |u - v|^2 = 2 - 2<u, v>, one pair at a time."""
    batch = t_maps[0].shape[0]
    d = torch.empty(batch, len(t_maps), len(s_maps), dtype=torch.float64)
    for b in range(batch):
        for i, t in enumerate(t_maps):
            ht, wt = t.shape[-2:]
            u = t[b].double().flatten()
            u = u / u.square().sum().sqrt()
            for j, s in enumerate(s_maps):
                v = adaptive_pool_loops(s[b], ht, wt).flatten()
                v = v / v.square().sum().sqrt()
                d[b, i, j] = (2.0 - 2.0 * torch.dot(u, v)) / (ht * wt)
    return d


def positive_maps(batch: int, sizes: list[tuple[int, int]], gen: torch.Generator) -> list:
    """Maps like mean_c(z^2): non-negative and (almost surely) not all zero."""
    return [torch.rand(batch, h, w, generator=gen) + 0.05 for h, w in sizes]


# ---------------------------------------------------------------------------------- pool


def test_pool_hand_computed() -> None:
    z = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -2.0], [1.0, 0.0]]]])  # [1, 2, 2, 2]
    channel_map, gap = reference.pool(z)
    # map = ((1,4,9,16) + (0,4,1,0)) / 2 ; gap = (10/4, -1/4)
    assert torch.equal(channel_map, torch.tensor([[[0.5, 4.0], [5.0, 8.0]]]))
    assert torch.equal(gap, torch.tensor([[2.5, -0.25]]))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 1, 1, 1), (1, 6, 4, 3), (2, 5, 9, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_matches_float64_einsum(shape: tuple[int, ...], channels_last: bool) -> None:
    z = torch.randn(shape)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    channel_map, gap = reference.pool(z)
    want_map, want_gap = pool_einsum(z)
    assert channel_map.shape == shape[:1] + shape[2:] and gap.shape == shape[:2]
    assert channel_map.dtype == gap.dtype == torch.float32
    torch.testing.assert_close(channel_map.double(), want_map, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gap.double(), want_gap, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pool_low_precision_input_accumulates_in_fp32(dtype: torch.dtype) -> None:
    # 256 channels of values ~1: a bf16/fp16 running sum would be off by ~1e-2 relative.
    z = (torch.rand(2, 256, 3, 5) + 0.5).to(dtype).to(memory_format=torch.channels_last)
    channel_map, gap = reference.pool(z)
    assert channel_map.dtype == gap.dtype == torch.float32
    want_map, want_gap = pool_einsum(z)  # exact values of the rounded inputs
    torch.testing.assert_close(channel_map.double(), want_map, rtol=1e-5, atol=0)
    torch.testing.assert_close(gap.double(), want_gap, rtol=1e-5, atol=0)


def test_pool_float64_stays_float64_and_rejects_non_4d() -> None:
    channel_map, gap = reference.pool(torch.randn(1, 2, 3, 3, dtype=torch.float64))
    assert channel_map.dtype == gap.dtype == torch.float64
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        reference.pool(torch.randn(2, 3, 4))


# ------------------------------------------------------------------------ pair_distances


def test_packed_forms_hand_computed() -> None:
    """pool_taps packs each tap's map and GAP per sample in tap order, and
    packed_pair_distances reads maps back at those offsets; checked on hand-set taps."""
    a = torch.zeros(1, 2, 1, 2)
    a[0, :, 0, 0] = torch.tensor([1.0, 3.0])  # position 0: mean_c z^2 = (1 + 9) / 2 = 5
    b = torch.full((1, 1, 2, 1), 2.0)  # one channel, two positions: map 4, 4; GAP 2
    maps, gaps = reference.pool_taps([a, b])
    torch.testing.assert_close(maps, torch.tensor([[5.0, 0.0, 4.0, 4.0]]))
    torch.testing.assert_close(gaps, torch.tensor([[0.5, 1.5, 2.0]]))  # a's GAP is 1/2, 3/2
    views = reference.unpack_maps(maps, [(1, 2), (2, 1)])
    assert [tuple(v.shape) for v in views] == [(1, 1, 2), (1, 2, 1)]
    assert views[1].data_ptr() == maps.data_ptr() + 2 * maps.element_size()  # no copy
    d = reference.packed_pair_distances(maps, maps, [(1, 2), (2, 1)], [(1, 2), (2, 1)])
    torch.testing.assert_close(d, reference.pair_distances(views, views))
    # map (5, 0) normalized is (1, 0); the (4, 4) map pooled to 1x2 is (4, 4) -> (1, 1)/sqrt2
    torch.testing.assert_close(d[0, 0, 1], torch.tensor(((1 - 0.5**0.5) ** 2 + 0.5) / 2))
    with pytest.raises(ValueError, match="packed"):
        reference.unpack_maps(maps, [(1, 2)])
    with pytest.raises(ValueError, match="one batch size"):
        reference.pool_taps([a, torch.zeros(2, 1, 1, 1)])


def test_pair_distances_hand_computed() -> None:
    t = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # v_t = (1, 0, 0, 0)
    s_corner = torch.zeros(1, 4, 4)
    s_corner[0, :2, :2] = 4.0  # pools to [[4, 0], [0, 0]] -> v_s = v_t
    s_flat = torch.ones(1, 4, 4)  # pools to ones -> v_s = (1/2, 1/2, 1/2, 1/2)
    s_small = torch.tensor([[[3.0]]])  # 1x1 upsampled to 2x2: same as s_flat
    d = reference.pair_distances([t], [s_corner, s_flat, s_small])
    # ((1 - 1/2)^2 + 3 * (1/2)^2) / 4 = 1/4
    torch.testing.assert_close(d, torch.tensor([[[0.0, 0.25, 0.25]]]))


SHAPE_CASES = [
    # teacher sizes, student sizes: odd sizes, non-divisible pooling, upsampling, n != m
    ([(5, 7), (3, 3)], [(9, 11), (4, 6), (2, 3)]),
    ([(1, 1), (6, 4), (7, 7)], [(7, 7), (13, 5)]),
    ([(4, 4)], [(8, 8)]),
]


@pytest.mark.parametrize(("t_sizes", "s_sizes"), SHAPE_CASES)
def test_pair_distances_match_float64_loops(t_sizes: list, s_sizes: list) -> None:
    gen = torch.Generator().manual_seed(len(t_sizes) * 10 + len(s_sizes))
    t_maps, s_maps = positive_maps(3, t_sizes, gen), positive_maps(3, s_sizes, gen)
    d = reference.pair_distances(t_maps, s_maps)
    assert d.shape == (3, len(t_sizes), len(s_sizes)) and d.dtype == torch.float32
    torch.testing.assert_close(d.double(), distances_loops(t_maps, s_maps), rtol=1e-5, atol=1e-7)


def test_pair_distances_properties() -> None:
    gen = torch.Generator().manual_seed(0)
    t, s = positive_maps(4, [(5, 5), (3, 6)], gen)
    d = reference.pair_distances([t], [t, 7.0 * t, s])
    assert torch.all(d[:, 0, :2].abs() < 1e-7)  # identical up to scale -> distance 0
    assert torch.all(d[:, 0, 2] > 1e-4)
    # per-sample: permuting the batch permutes d
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(reference.pair_distances([t[perm]], [s[perm]]), d[perm][:, :, 2:])


def test_pair_distances_all_zero_map_is_finite() -> None:
    # A dead (all-zero) map normalizes to zero (F.normalize clamps the norm at 1e-12).
    t = torch.rand(2, 3, 3) + 0.1
    d = reference.pair_distances([t], [torch.zeros(2, 6, 6)])
    torch.testing.assert_close(d, torch.full((2, 1, 1), 1.0 / 9.0))


# -------------------------------------------------------------------------- weighted_sum


def test_weighted_sum_hand_computed() -> None:
    d = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    attn = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    # sample 0: 0.5 + 1 + 3 = 4.5; sample 1: 0; mean over the batch
    assert reference.weighted_sum(d, attn).item() == pytest.approx(2.25)


def test_weighted_sum_matches_einsum_and_checks_shapes() -> None:
    d, attn = torch.rand(3, 4, 5), torch.rand(3, 4, 5).softmax(-1)
    want = torch.einsum("bij,bij->b", d.double(), attn.double()).mean()
    torch.testing.assert_close(reference.weighted_sum(d, attn).double(), want)
    with pytest.raises(ValueError, match="same"):
        reference.weighted_sum(d, attn[:, :, :4])


def test_feature_distillation_composes_the_three_ops() -> None:
    gen = torch.Generator().manual_seed(1)
    t_feats = [torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)]
    s_feats = [torch.randn(2, 2, 7, 7, generator=gen).to(memory_format=torch.channels_last)]
    attn = torch.rand(2, 2, 1, generator=gen)
    t_maps = [pool_einsum(z)[0] for z in t_feats]
    s_maps = [pool_einsum(z)[0] for z in s_feats]
    want = torch.einsum("bij,bij->b", distances_loops(t_maps, s_maps), attn.double()).mean()
    got = reference.feature_distillation(t_feats, s_feats, attn)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- gradients


def test_gradcheck_pool() -> None:
    z = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(reference.pool, (z,))
    z_cl = torch.randn(2, 3, 3, 2, dtype=torch.float64).to(memory_format=torch.channels_last)
    assert gradcheck(reference.pool, (z_cl.requires_grad_(),))


def test_gradcheck_pair_distances() -> None:
    gen = torch.Generator().manual_seed(2)
    t_maps = [m.double() for m in positive_maps(2, [(3, 2), (2, 2)], gen)]
    s_maps = [m.double().requires_grad_() for m in positive_maps(2, [(5, 3), (1, 2), (2, 2)], gen)]

    def student_only(*s: torch.Tensor) -> torch.Tensor:
        return reference.pair_distances(t_maps, list(s))

    assert gradcheck(student_only, tuple(s_maps))

    def both(t0: torch.Tensor, t1: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
        return reference.pair_distances([t0, t1], [s0])

    assert gradcheck(both, (t_maps[0].requires_grad_(), t_maps[1].requires_grad_(), s_maps[0]))


def test_gradcheck_weighted_sum_and_composition() -> None:
    d = torch.rand(2, 3, 2, dtype=torch.float64, requires_grad=True)
    attn = torch.rand(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(reference.weighted_sum, (d, attn))

    t_feats = [torch.randn(2, 2, 3, 3, dtype=torch.float64)]
    s0 = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    s1 = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 1, 2, dtype=torch.float64, requires_grad=True)

    def composed(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return reference.feature_distillation(t_feats, [x, y], w)

    assert gradcheck(composed, (s0, s1, a))

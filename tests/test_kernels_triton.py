"""The Triton kernels themselves (not the reference fallback), run by Triton's interpreter.

Collected only under TRITON_INTERPRET=1, which must be set before Triton is imported:
tests/test_kernels.py::test_triton_kernels_under_interpreter runs this module in a fresh
subprocess with TRITON_INTERPRET=1 and FASTIBD_POISON_OUTPUTS=1 (every buffer a host
function allocates starts as NaN, so an element a kernel forgot to write fails the
comparison). Run it alone with:

    TRITON_INTERPRET=1 FASTIBD_POISON_OUTPUTS=1 python -m pytest -q tests/test_kernels_triton.py

Every result is compared with a float64 eager reference on fresh random inputs, forward and
every gradient. The interpreter is slow: shapes are tiny but cover the edge cases (C not a
multiple of the block, H*W = 1, odd sizes, several spatial blocks, student maps larger /
smaller / equal to the teacher's, n != m, both memory formats, fp32/fp16/bf16).
"""

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

from kernels import reference
from tests.feature_loss_check import assert_fused_matches_eager

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs in a TRITON_INTERPRET=1 subprocess started by tests/test_kernels.py",
                allow_module_level=True)

from kernels import common, fused, pairs, pool  # noqa: E402  (after the skip: imports Triton)

# Relative tolerance of a gradient stored in each dtype (its rounding), and of fp32 maths.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def test_environment_is_interpreted_and_poisoned() -> None:
    assert common.use_triton([torch.zeros(1)])  # CPU tensors are routed to the kernels
    assert os.environ.get("FASTIBD_POISON_OUTPUTS") == "1"


# ---------------------------------------------------------------------------------- pool


def pool_reference64(z: torch.Tensor, g_map: torch.Tensor | None, g_gap: torch.Tensor | None):
    """float64 map, gap and dz (autograd of the reference on the rounded inputs)."""
    z64 = z.detach().double().requires_grad_()
    channel_map, gap = reference.pool(z64)
    loss = channel_map.new_zeros(())
    if g_map is not None:
        loss = loss + (channel_map * g_map.double()).sum()
    if g_gap is not None:
        loss = loss + (gap * g_gap.double()).sum()
    (dz,) = torch.autograd.grad(loss, z64)
    return channel_map, gap, dz


def check_pool(z: torch.Tensor, *, with_map: bool = True, with_gap: bool = True,
               block_hw: int | None = None, block_c: int | None = None) -> None:
    gen = torch.Generator().manual_seed(z.numel())
    batch, channels, h, w = z.shape
    g_map = torch.randn(batch, h, w, generator=gen) if with_map else None
    g_gap = torch.randn(batch, channels, generator=gen) if with_gap else None
    maps, gap = pool.pool_fwd([z], block_hw, block_c)
    channel_map = maps.view(batch, h, w)
    g_maps = g_map.reshape(batch, h * w) if with_map else None
    (dz,) = pool.pool_bwd([z], g_maps, g_gap, block_hw, block_c)
    want_map, want_gap, want_dz = pool_reference64(z, g_map, g_gap)
    assert channel_map.dtype == gap.dtype == torch.float32
    assert channel_map.shape == (batch, h, w) and gap.shape == (batch, channels)
    torch.testing.assert_close(channel_map.double(), want_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gap.double(), want_gap, rtol=1e-5, atol=1e-6)
    # dz keeps z's dtype and memory format
    assert dz.dtype == z.dtype and dz.shape == z.shape
    _, channels_last = pool.dense_sample_layout(z)  # z's layout, or the one it is copied to
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert dz.is_contiguous(memory_format=fmt)
    rtol = GRAD_RTOL[z.dtype]
    scale = want_dz.abs().max().item()
    torch.testing.assert_close(dz.double(), want_dz, rtol=rtol, atol=rtol * scale + 1e-12)


POOL_SHAPES = [
    (2, 5, 3, 7),  # odd H, W; C=5 and H*W=21 not multiples of the forced blocks below
    (3, 1, 1, 1),  # H*W = 1, C = 1
    (2, 40, 4, 4),  # C > the default channel block (32 in channels_last)
    (1, 3, 9, 9),  # B = 1
    (2, 33, 1, 5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_pool_kernels_match_float64(shape, channels_last: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + 7 * channels_last)
    z = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    check_pool(z)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_kernels_with_several_blocks_both_ways(channels_last: bool) -> None:
    """Small forced blocks: several spatial blocks (GAP partials summed), ragged last blocks
    in both the channel and the spatial direction."""
    z = torch.randn(2, 11, 5, 7, generator=torch.Generator().manual_seed(3))
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    check_pool(z, block_hw=8, block_c=4)


@pytest.mark.parametrize(("with_map", "with_gap"), [(True, False), (False, True)])
def test_pool_backward_with_one_gradient(with_map: bool, with_gap: bool) -> None:
    z = torch.randn(2, 6, 3, 3).to(memory_format=torch.channels_last)
    check_pool(z, with_map=with_map, with_gap=with_gap)


def test_pool_batch_strided_and_non_dense_inputs() -> None:
    base = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(4))
    check_pool(base[::2])  # every other sample: read in place through the batch stride
    check_pool(base.to(memory_format=torch.channels_last)[1:3])
    check_pool(base[:, 1:4])  # a channel slice of NCHW: still dense within a sample
    sliced_cl = base.to(memory_format=torch.channels_last)[:, 1:4]  # not dense: copied
    assert pool.sample_layout(sliced_cl) is None
    check_pool(sliced_cl)
    check_pool(base.permute(0, 1, 3, 2))  # transposed H/W: copied


@contextlib.contextmanager
def counted_launches() -> Iterator[list[tuple[str, dict]]]:
    """(kernel name, constexprs and options) of every launch made inside, each still run."""
    launches: list[tuple[str, dict]] = []
    kernel_type = type(pool._pool_fwd_kernel)  # the interpreter's, here; JITFunction on GPUs
    real = kernel_type.run

    def counting(self, *args, **kwargs):
        launches.append((self.fn.__name__ if hasattr(self, "fn") else self.__name__, kwargs))
        return real(self, *args, **kwargs)

    kernel_type.run = counting
    try:
        yield launches
    finally:
        kernel_type.run = real


def grouped_taps() -> list[torch.Tensor]:
    """Taps of one model as the grouped launch sees them: several sizes and channel counts,
    both memory formats and three dtypes (so four launch groups), one batch-strided tap, one
    channel slice (copied), H*W = 1."""
    gen = torch.Generator().manual_seed(11)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    cl = torch.channels_last
    return [
        randn(2, 5, 3, 7),  # fp32 NCHW
        randn(2, 40, 4, 4).to(memory_format=cl),  # fp32 channels_last
        randn(4, 6, 5, 5).to(memory_format=cl)[::2],  # batch-strided, read in place
        randn(2, 33, 1, 5).bfloat16(),  # bf16 NCHW
        randn(2, 9, 6, 6).bfloat16().to(memory_format=cl),  # bf16 channels_last
        randn(2, 7, 2, 3).half().to(memory_format=cl),  # fp16 channels_last
        randn(2, 8, 3, 3).to(memory_format=cl)[:, 2:6],  # a channel slice: not dense, copied
        randn(2, 3, 1, 1),  # H*W = 1
    ]


@pytest.mark.parametrize(("block_hw", "block_c"), [(None, None), (8, 4)])
def test_grouped_pool_of_mixed_taps_matches_float64(block_hw, block_c) -> None:
    """All taps in one pool_fwd / pool_bwd: maps and GAPs land at each tap's offset of the
    packed rows, dz in each tap's dtype and layout. With forced small blocks every tap but
    the smallest spans several spatial blocks, so the in-launch GAP reduction runs."""
    taps = grouped_taps()
    plan = pool.pool_plan(taps, block_hw, block_c)
    assert len(plan.groups) == 5  # fp32 NCHW, fp32 CL, bf16 NCHW, bf16 CL, fp16 CL
    assert (plan.reduce is None) == (block_hw is None)
    check_grouped_pool(taps, plan)


def test_small_maps_apart_match_float64() -> None:
    """pool_plan(small_maps_apart=True), the alternative `kernels.bench --tiles` measures:
    taps of <= 64 positions get launches and tiles of their own (all positions in one block,
    the rest of the tile along channels), beside the large taps' launch, whose GAPs still
    need the reduction; the packed rows are the same as with one launch."""
    gen = torch.Generator().manual_seed(13)
    cl = torch.channels_last

    def tap(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl)

    taps = [tap(2, 24, 12, 12), tap(2, 40, 7, 7), tap(2, 200, 5, 5), tap(2, 16, 8, 8),
            tap(2, 8, 9, 9), torch.randn(2, 6, 3, 3, generator=gen)]  # the last NCHW
    plan = pool.pool_plan(taps, small_maps_apart=True)
    tiles = {g.taps: (g.block_hw, g.block_c) for g in plan.groups}
    # 12x12 and 9x9 (81 > 64 positions) share the default tile; 7x7 and 5x5 a tile of the
    # larger's 64 positions x 64 channels (the 5x5's 200 channels: four blocks, one partly
    # masked); the 8x8 tap's 16 channels are aligned, so it launches apart, 16 wide; the
    # NCHW tap keeps the NCHW rule
    assert tiles == {(0, 4): (128, 32), (1, 2): (64, 64), (3,): (64, 16), (5,): (16, 8)}, tiles
    assert plan.reduce is not None  # the 12x12 tap spans two blocks of 128
    assert len(pool.pool_plan(taps).groups) == 3  # without it: by alignment and layout only
    check_grouped_pool(taps, plan)


def check_grouped_pool(taps: list[torch.Tensor], plan: pool.PoolPlan) -> None:
    """pool_fwd and pool_bwd of all taps with `plan` against the float64 reference, tap by
    tap: maps and GAPs at each tap's offset of the packed rows, dz in its dtype and layout."""
    batch = taps[0].shape[0]
    gen = torch.Generator().manual_seed(12)
    g_maps = torch.randn(batch, plan.maps_len, generator=gen)
    g_gaps = torch.randn(batch, plan.gaps_len, generator=gen)
    maps, gaps = pool.pool_fwd(taps, plan=plan)
    dzs = pool.pool_bwd(taps, g_maps, g_gaps, plan=plan)
    sizes = [(z.shape[2], z.shape[3]) for z in taps]
    want_maps = [reference.pool(z.double())[0] for z in taps]
    assert maps.shape == (batch, plan.maps_len) and gaps.shape == (batch, plan.gaps_len)
    for got, want in zip(reference.unpack_maps(maps, sizes), want_maps, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    map_rows = reference.unpack_maps(g_maps, sizes)
    gap_rows = g_gaps.split([z.shape[1] for z in taps], dim=1)
    for k, (z, dz, gm, gg, gap) in enumerate(zip(
            taps, dzs, map_rows, gap_rows, gaps.split([z.shape[1] for z in taps], dim=1),
            strict=True)):
        _, want_gap, want_dz = pool_reference64(z, gm, gg)
        torch.testing.assert_close(gap.double(), want_gap, rtol=1e-5, atol=1e-6)
        assert dz.dtype == z.dtype and dz.shape == z.shape, k
        _, channels_last = pool.dense_sample_layout(z)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert dz.is_contiguous(memory_format=fmt), k
        rtol = GRAD_RTOL[z.dtype]
        torch.testing.assert_close(dz.double(), want_dz, rtol=rtol,
                                   atol=rtol * want_dz.abs().max().item() + 1e-12,
                                   msg=lambda m, k=k: f"tap {k}: {m}")


def test_grouped_pool_launches_once_per_dtype_and_layout() -> None:
    """The launch count does not grow with the taps: one forward launch per (dtype, memory
    format) group, one GAP reduction for all taps when any spans several blocks."""
    taps = grouped_taps()
    with counted_launches() as launches:
        pool.pool_fwd(taps)
        pool.pool_fwd(taps, 8, 4)
        pool.pool_bwd(taps, None, torch.zeros(2, sum(z.shape[1] for z in taps)))
    names = [name for name, _ in launches]
    assert names == ["_pool_fwd_kernel"] * 10 + ["_gap_reduce_kernel"] + ["_pool_bwd_kernel"] * 5
    assert sorted(kwargs["N_TAPS"] for _, kwargs in launches[:5]) == [1, 1, 1, 2, 3]


# -------------------------------------------------------------------------------- pairs


def positive_maps(batch: int, sizes, gen: torch.Generator) -> list[torch.Tensor]:
    """Maps like mean_c(z^2): non-negative, not all zero."""
    return [torch.rand(batch, h, w, generator=gen) + 0.05 for h, w in sizes]


def pairs_reference64(t_maps, s_maps, grad_d):
    ts = [x.detach().double().requires_grad_() for x in t_maps]
    ss = [x.detach().double().requires_grad_() for x in s_maps]
    d = reference.pair_distances(ts, ss)
    grads = torch.autograd.grad(d, ts + ss, grad_d.double())
    return d, list(grads[: len(ts)]), list(grads[len(ts):])


def assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float) -> None:
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, k
        scale = b.abs().max().item()
        rtol = max(rtol, GRAD_RTOL[a.dtype])  # gradients come back in each map's dtype
        # atol: fp32 round-off of terms that cancel (e.g. the exactly-zero gradient of a
        # 1x1 map, whose normalized value cannot change) stays at ~1e-7 of O(1e-2) terms.
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * scale + 1e-6,
                                   msg=lambda m, k=k: f"map {k}: {m}")


def assert_distances_close(d: torch.Tensor, want: torch.Tensor, t_maps) -> None:
    """d = (|u|^2 + |v|^2 - 2<u, v>) / HW in fp32 carries a few ulps of 1 (1.2e-7) of
    absolute error divided by the teacher map's HW (e.g. 1.2e-7 instead of the reference's
    exact 0 for two 1x1 maps): the tolerance is that, plus 1e-4 relative."""
    hw = torch.tensor([x.shape[-2] * x.shape[-1] for x in t_maps], dtype=torch.float64)
    allowed = 1e-4 * want.abs() + 5e-7 / hw[None, :, None]
    err = (d.double() - want).abs()
    excess = (err - allowed).max()
    assert torch.all(err <= allowed), f"max error {err.max():.3g}, excess {excess:.3g}"


def check_pairs(t_maps, s_maps, need_t: bool = True, need_s: bool = True) -> None:
    gen = torch.Generator().manual_seed(len(t_maps) * 100 + len(s_maps))
    t_sizes, s_sizes = reference.sizes_of(t_maps), reference.sizes_of(s_maps)
    t_packed, s_packed = pairs.pack(t_maps), pairs.pack(s_maps)
    d, stats = pairs.pairs_fwd(t_packed, s_packed, t_sizes, s_sizes)
    batch, n, m = t_maps[0].shape[0], len(t_maps), len(s_maps)
    assert d.shape == (batch, n, m) and d.dtype == torch.float32
    assert stats.shape == (3, batch, n, m)
    grad_d = torch.rand(batch, n, m, generator=gen)
    want_d, want_gt, want_gs = pairs_reference64(t_maps, s_maps, grad_d)
    assert_distances_close(d, want_d, t_maps)
    gt, gs = pairs.pairs_bwd(grad_d, t_packed, s_packed, t_sizes, s_sizes, stats, need_t,
                             need_s)
    if need_t:
        assert_grads_close(reference.unpack_maps(gt, t_sizes), want_gt, 1e-4)
    else:
        assert gt.numel() == 0
    if need_s:
        assert_grads_close(reference.unpack_maps(gs, s_sizes), want_gs, 1e-4)
    else:
        assert gs.numel() == 0


PAIR_CASES = [
    # teacher sizes, student sizes
    ([(5, 7), (3, 3)], [(9, 11), (4, 6), (2, 3)]),  # odd sizes, uneven windows, n != m
    ([(1, 1), (6, 4), (7, 7)], [(7, 7), (13, 5)]),  # 1x1 teacher, equal sizes, n > m
    ([(4, 4), (8, 8), (4, 4), (2, 2)], [(8, 8), (1, 1), (4, 4), (10, 10), (2, 2)]),  # groups
    ([(17, 3)], [(4, 9)]),  # one pair, rows downsampled and columns upsampled
]


@pytest.mark.parametrize(("t_sizes", "s_sizes"), PAIR_CASES)
def test_pairs_kernels_match_float64(t_sizes, s_sizes) -> None:
    gen = torch.Generator().manual_seed(len(t_sizes) + 10 * len(s_sizes))
    check_pairs(positive_maps(2, t_sizes, gen), positive_maps(2, s_sizes, gen))


def test_pairs_kernels_with_several_position_blocks_per_map() -> None:
    """The multi-block accumulation every ImageNet and CIFAR shape uses: five teacher maps of
    one size make a [8, BLOCK] tile with BLOCK = 256 < 24 * 24 (three blocks, the last one
    partly masked), and the stage-2 student loop walks a 20x20 map in two blocks."""
    gen = torch.Generator().manual_seed(8)
    t_maps = positive_maps(2, [(24, 24)] * 5 + [(6, 6)], gen)
    s_maps = positive_maps(2, [(20, 20), (12, 12), (3, 3)], gen)
    plan = pairs.pair_plan(reference.sizes_of(t_maps), reference.sizes_of(s_maps), t_maps[0].device)
    assert plan.block < 24 * 24 and 24 * 24 % plan.block != 0, plan.block
    assert plan.block_s < 20 * 20, plan.block_s
    check_pairs(t_maps, s_maps)


def test_pairs_kernels_student_or_teacher_gradient_only() -> None:
    gen = torch.Generator().manual_seed(5)
    t_maps = positive_maps(2, [(4, 4), (2, 2)], gen)
    s_maps = positive_maps(2, [(8, 8), (3, 3)], gen)
    check_pairs(t_maps, s_maps, need_t=False, need_s=True)
    check_pairs(t_maps, s_maps, need_t=True, need_s=False)


def test_pairs_kernels_all_zero_maps_follow_normalize_eps() -> None:
    """A dead (all-zero) map normalizes to 0 (norm clamped at 1e-12): d = 1/HW, and its
    gradient is huge (1/eps) but finite and equal to the reference's."""
    gen = torch.Generator().manual_seed(6)
    t_maps = positive_maps(2, [(3, 3), (2, 2)], gen)
    s_maps = positive_maps(2, [(6, 6), (3, 3)], gen)
    s_maps[0][1] = 0.0  # sample 1 of student map 0
    t_maps[1][0] = 0.0  # sample 0 of teacher map 1
    check_pairs(t_maps, s_maps)
    d = fused.pair_distances(t_maps, s_maps)
    torch.testing.assert_close(d[1, 0, 0], torch.tensor(1.0 / 9.0))
    assert torch.isfinite(d).all()


def test_pairs_kernels_read_packed_rows_of_any_batch_stride() -> None:
    """Packed maps that are views of larger tensors (a column slice: the row stride is wider
    than the packed row; every other sample: a batch step) give the float64 reference's
    distances and gradients, the gradient reaching the larger tensor through the view."""
    gen = torch.Generator().manual_seed(14)
    t_sizes, s_sizes = [(4, 4), (2, 3)], [(5, 5), (3, 3)]
    lt, ls = sum(h * w for h, w in t_sizes), sum(h * w for h, w in s_sizes)
    t_big = torch.rand(3, lt + 7, generator=gen) + 0.05
    s_big = (torch.rand(6, ls, generator=gen) + 0.05).requires_grad_()
    t_packed, s_packed = t_big[:, 3:3 + lt], s_big[::2]
    assert t_packed.stride(0) != lt and s_packed.stride(0) != ls
    d = fused.packed_pair_distances(t_packed, s_packed, t_sizes, s_sizes)
    grad_d = torch.rand(d.shape, generator=gen)
    (g_big,) = torch.autograd.grad(d, s_big, grad_d)
    want_d, _, want_gs = pairs_reference64(reference.unpack_maps(t_packed, t_sizes),
                                           reference.unpack_maps(s_packed.detach(), s_sizes),
                                           grad_d)
    assert_distances_close(d, want_d, reference.unpack_maps(t_packed, t_sizes))
    assert torch.all(g_big[1::2] == 0)  # the samples the view skips
    assert_grads_close(reference.unpack_maps(g_big[::2], s_sizes), want_gs, 1e-4)


def test_pairs_kernels_accept_low_precision_maps() -> None:
    gen = torch.Generator().manual_seed(7)
    t_maps = [m.bfloat16() for m in positive_maps(2, [(4, 4)], gen)]
    s_maps = [m.half() for m in positive_maps(2, [(2, 2), (5, 5)], gen)]
    check_pairs(t_maps, s_maps)


# ----------------------------------------------------- the registered ops on the Triton path


def test_ops_run_triton_and_pass_opcheck() -> None:
    """Under the interpreter the custom ops dispatch to the kernels (stats is non-empty only
    there); opcheck compares the fake functions with the real Triton outputs. The eager
    wiring (an autograd.Function, kernels.common.eager_triton) gives the op's values and
    gradients exactly: both run the same host functions."""
    gen = torch.Generator().manual_seed(8)
    taps = [torch.randn(2, 5, 2, 3, generator=gen).to(memory_format=torch.channels_last),
            torch.randn(2, 3, 4, 4, generator=gen).bfloat16()]
    taps = [z.requires_grad_() for z in taps]
    torch.library.opcheck(pool.pool_taps_op, (taps,))
    t_maps = positive_maps(2, [(2, 2), (1, 1)], gen)
    s_maps = positive_maps(2, [(3, 3), (2, 2)], gen)
    t_sizes, s_sizes = reference.sizes_of(t_maps), reference.sizes_of(s_maps)
    args = (pairs.pack(t_maps), pairs.pack(s_maps).requires_grad_(),
            [v for size in t_sizes for v in size], [v for size in s_sizes for v in size])
    d, stats = pairs.pair_distances_op(*args)
    assert stats.shape == (3, 2, 2, 2)
    torch.library.opcheck(pairs.pair_distances_op, args)

    def through(maps_gaps, packed) -> list[torch.Tensor]:
        (maps, gaps), d = maps_gaps, packed
        value = maps.square().sum() + gaps.sum() + d.sum()
        return [maps, gaps, d, *torch.autograd.grad(value, [*taps, args[1]])]

    by_op = through(pool.pool_taps_op(taps), pairs.pair_distances_op(*args)[0])
    assert common.eager_triton(taps)
    by_function = through(fused.pool_taps(taps),
                          fused.packed_pair_distances(args[0], args[1], t_sizes, s_sizes))
    for a, b in zip(by_op, by_function, strict=True):
        assert torch.equal(a, b)


def test_pool_backward_fake_promises_the_real_strides() -> None:
    """The backward op's fake (what torch.compile plans memory with) gives dz the strides
    the kernels write, also for taps the kernels cannot index in place and copy: H and W
    transposed, a channel slice of channels_last, a batch step."""
    gen = torch.Generator().manual_seed(15)
    base = torch.randn(4, 6, 5, 3, generator=gen)
    cl = base.to(memory_format=torch.channels_last)
    for z in (base.permute(0, 1, 3, 2), cl[:, 1:4], cl[::2], base[::2], cl):
        sizes = z.shape[2] * z.shape[3]
        g_maps = torch.randn(z.shape[0], sizes, generator=gen)
        g_gaps = torch.randn(z.shape[0], z.shape[1], generator=gen)
        (dz,) = pool.pool_taps_backward_op([z], g_maps, g_gaps)
        assert dz.stride() == pool._like(z, pool.dz_memory_format(z)).stride()
        torch.library.opcheck(pool.pool_taps_backward_op, ([z], g_maps, g_gaps))
        torch.library.opcheck(pool.pool_taps_op, ([z.detach().requires_grad_()],))


@pytest.mark.parametrize("node", ["pool", "pairs", "feature_terms"])
def test_eager_nodes_refuse_double_backward(node: str) -> None:
    """The eager autograd nodes' backwards are not differentiable: asking for a gradient
    with create_graph=True is an error, not a gradient whose own gradient is silently
    missing (its second-order terms)."""
    gen = torch.Generator().manual_seed(16)
    node_op = {"pool": "pool_taps", "pairs": "pair_distances", "feature_terms": "feature_terms"}
    z = torch.randn(2, 3, 4, 4, generator=gen).requires_grad_()
    if node == "pool":
        maps, gaps = fused.pool_taps([z])
        out = maps.sum() + gaps.sum()
    elif node == "pairs":
        z = (torch.rand(2, 4, 4, generator=gen) + 0.05).requires_grad_()
        out = fused.pair_distances([torch.rand(2, 3, 3, generator=gen) + 0.05], [z]).sum()
    else:
        _, s_gaps, d = fused.feature_terms([torch.randn(2, 5, 2, 2, generator=gen)], [z])
        out = s_gaps.sum() + d.sum()
    with pytest.raises(RuntimeError, match=f"{node_op[node]} has no double backward"):
        torch.autograd.grad(out, z, create_graph=True)
    (g,) = torch.autograd.grad(out, z)  # first order: unchanged
    assert torch.isfinite(g).all()


def test_launches_per_loss_forward_backward() -> None:
    """The Triton launches of one feature-loss forward + backward at the ImageNet tap
    structure (ResNet-50 -> ResNet-50: 16 + 16 taps; 1/16 of the channels, 64 px), counted: one
    pool forward and one GAP reduction per side (the 16x16 taps span two blocks), one pairs
    forward, two pairs backward kernels, one pool backward (the teacher's taps are detached):
    8, whatever the number of taps (issue #14's target: <= 8)."""
    from collections import Counter

    def taps(batch: int = 1) -> list[torch.Tensor]:
        shapes = [(c // 16, s, s) for blocks, c, s in ((3, 256, 16), (4, 512, 8),
                                                        (6, 1024, 4), (3, 2048, 2))
                  for _ in range(blocks)]
        return [torch.randn(batch, *shape).to(memory_format=torch.channels_last)
                for shape in shapes]

    t_taps, s_taps = taps(), [z.requires_grad_() for z in taps()]
    with counted_launches() as launches:
        _, s_gaps, d = fused.feature_terms(t_taps, s_taps)
        attn = torch.rand(d.shape).softmax(-1)
        loss = fused.weighted_sum(d, attn) + s_gaps.square().mean()
        loss.backward()
    counts = Counter(name for name, _ in launches)
    assert dict(counts) == {"_pool_fwd_kernel": 2, "_gap_reduce_kernel": 2,
                            "_pairs_fwd_kernel": 1, "_pairs_bwd_resized_kernel": 1,
                            "_pairs_bwd_student_kernel": 1, "_pool_bwd_kernel": 1}
    assert sum(counts.values()) == 8
    assert all(z.grad is not None and torch.isfinite(z.grad).all() for z in s_taps)


def feature_taps(gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A teacher side of three dtypes and both layouts (three pool groups) and a student
    side with a 17x17 NCHW tap (two spatial blocks: the GAP reduction runs), a
    batch-strided tap, a channel slice and a 1x1 tap; every tap asks for a gradient."""
    cl = torch.channels_last
    t_taps = [torch.randn(2, 6, 2, 2, generator=gen).to(memory_format=cl),
              torch.randn(2, 5, 3, 7, generator=gen).bfloat16(),
              torch.randn(2, 9, 4, 4, generator=gen).half().to(memory_format=cl)]
    s_taps = [torch.randn(2, 4, 17, 17, generator=gen),
              torch.randn(4, 7, 6, 6, generator=gen).to(memory_format=cl)[::2],
              torch.randn(2, 8, 5, 5, generator=gen).bfloat16()[:, 1:6],
              torch.randn(2, 3, 1, 1, generator=gen)]
    return ([z.requires_grad_() for z in t_taps],
            [z.detach().requires_grad_() for z in s_taps])


@pytest.mark.parametrize("reaching", ["both", "distances", "gaps"])
def test_feature_terms_in_one_node_match_float64(reaching: str) -> None:
    """fused.feature_terms, called eagerly, is one autograd node for both pools and the pair
    distances; t_gaps, s_gaps, d and each student tap's dz (its dtype and layout) match the
    float64 reference, with the distances, the student GAPs or both reaching the loss; the
    teacher gets no gradient although its taps ask for one."""
    gen = torch.Generator().manual_seed(21)
    t_taps, s_taps = feature_taps(gen)
    assert len(pool.pool_plan([z.detach() for z in t_taps]).groups) == 3
    assert pool.pool_plan([z.detach() for z in s_taps]).reduce is not None
    t_gaps, s_gaps, d = fused.feature_terms(t_taps, s_taps)
    assert d.grad_fn is s_gaps.grad_fn and type(d.grad_fn).__name__.startswith("_EagerFeature")
    assert not t_gaps.requires_grad
    # the node links to the student's taps only: the teacher's graph is not kept alive by it
    assert sum(fn is not None for fn, _ in d.grad_fn.next_functions) == len(s_taps)
    w_d = torch.randn(d.shape, generator=gen)
    w_s = torch.randn(s_gaps.shape, generator=gen)

    def loss(s_gaps, d):
        terms = {"distances": (d * w_d.to(d.dtype)).sum(),
                 "gaps": (s_gaps * w_s.to(s_gaps.dtype)).sum()}
        return sum(terms.values()) if reaching == "both" else terms[reaching]

    t64 = [z.detach().double() for z in t_taps]
    s64 = [z.detach().double().requires_grad_() for z in s_taps]
    want = reference.feature_terms(t64, s64)
    want_dz = torch.autograd.grad(loss(want[1], want[2]), s64)
    for got, w in zip((t_gaps, s_gaps, d), want, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)
    dzs = torch.autograd.grad(loss(s_gaps, d), s_taps)
    # atol on the scale of all the student's gradients, plus fp32 round-off of terms that
    # cancel: the 1x1 tap's gradient through the distances is exactly zero (its normalized
    # map cannot change), here ~3e-8 from the cancelling terms of its map's gradient
    scale = max(w.abs().max().item() for w in want_dz)
    for k, (z, dz, w) in enumerate(zip(s_taps, dzs, want_dz, strict=True)):
        _, channels_last = pool.dense_sample_layout(z)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert dz.dtype == z.dtype and dz.is_contiguous(memory_format=fmt), k
        rtol = GRAD_RTOL[z.dtype]
        torch.testing.assert_close(dz.double(), w, rtol=rtol, atol=rtol * scale + 1e-7,
                                   msg=lambda m, k=k: f"tap {k}: {m}")
    assert all(z.grad is None for z in t_taps)
    if reaching == "gaps":  # one student tap without a gradient: the others' dz are the same
        frozen = s_taps[1].detach()
        _, s_gaps, d = fused.feature_terms(t_taps, [s_taps[0], frozen, *s_taps[2:]])
        rest = [s_taps[0], *s_taps[2:]]
        for got, want in zip(torch.autograd.grad(loss(s_gaps, d), rest),
                             [dzs[0], *dzs[2:]], strict=True):
            assert torch.equal(got, want)


def test_composed_triton_path_matches_reference_with_compile() -> None:
    """pool -> pair_distances -> weighted_sum through autograd and torch.compile(aot_eager,
    fullgraph=True), every op on its Triton kernel, against the float64 reference."""
    gen = torch.Generator().manual_seed(9)
    t_feats = [torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 5, 2, 2, generator=gen)]
    s_feats = [torch.randn(2, 4, 6, 6, generator=gen).bfloat16(),
               torch.randn(2, 3, 3, 3, generator=gen)]
    s_feats = [s.to(memory_format=torch.channels_last).requires_grad_() for s in s_feats]
    attn = torch.rand(2, 2, 2, generator=gen).softmax(-1)

    def loss(t_feats, s_feats, attn):
        t_maps = [fused.pool(z.detach())[0] for z in t_feats]
        s_pooled = [fused.pool(z) for z in s_feats]
        d = fused.pair_distances(t_maps, [mp for mp, _ in s_pooled])
        return fused.weighted_sum(d, attn) + sum(g.square().mean() for _, g in s_pooled)

    s64 = [s.detach().double().requires_grad_() for s in s_feats]
    want = loss([t.double() for t in t_feats], s64, attn.double())
    want_grads = torch.autograd.grad(want, s64)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for fn in (loss, compiled):
        got = fn(t_feats, s_feats, attn)
        grads = torch.autograd.grad(got, s_feats)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        for g, w, s in zip(grads, want_grads, s_feats, strict=True):
            assert g.dtype == s.dtype and g.is_contiguous(memory_format=torch.channels_last)
            rtol = GRAD_RTOL[g.dtype]
            torch.testing.assert_close(g.double(), w, rtol=rtol,
                                       atol=rtol * w.abs().max().item())


def test_feature_distillation_fused_equals_eager_on_model_taps() -> None:
    """The real loss on the real taps of two tiny ResNet-18s (channels_last, 16 px): value
    and gradients (student parameters through the taps, attention parameters) with every
    fused op on its Triton kernel, against backend='eager'."""
    from fastibd.models import build_model

    torch.manual_seed(0)
    teacher = build_model("resnet18", width_mult=1 / 8, normalization="none").eval()
    student = build_model("resnet18", width_mult=1 / 8, normalization="none")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        _, t_taps = teacher(x.to(memory_format=torch.channels_last), features=True)
    # The student runs NCHW (its CPU training layout: oneDNN's channels_last weight gradient
    # is unreliable for narrow layers, see fastibd.device.training_memory_format); its taps
    # reach the kernels in channels_last, as on CUDA.
    _, s_taps = student(x, features=True)
    s_taps = [t.contiguous(memory_format=torch.channels_last) for t in s_taps]
    # absolute floor of the gradients: biases in front of BatchNorm have zero gradient up to
    # round-off
    fused_fd = assert_fused_matches_eager(t_taps, s_taps, student, dict(rtol=1e-5, atol=1e-7),
                                          dict(rtol=1e-3, atol=1e-6))
    assert fused_fd.kernels.feature_terms is fused.feature_terms

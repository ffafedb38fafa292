"""Triton kernels of the `pair_distances` op: all n x m teacher/student map distances.

For teacher map i (size Ht x Wt, HW = Ht*Wt) and student map j, per sample b:

    t = flatten(t_i),  r = flatten(adaptive_avg_pool(s_j, (Ht, Wt)))
    a = 1 / max(|t|, eps),  c = 1 / max(|r|, eps)            (F.normalize, eps = 1e-12)
    d = mean_hw (a t - c r)^2 = (|a t|^2 + |c r|^2 - 2 a c <t, r>) / HW

so one pass over the maps that accumulates the three sums tt = |t|^2, rr = |r|^2, tr = <t, r>
gives d exactly as the reference defines it (|a t|^2 is 1 for a map with |t| > eps and
tt/eps^2 otherwise, i.e. 0 for an all-zero map; d is clamped at 0 against round-off).

Launch plan (forward: ONE launch for all n*m pairs; backward: two launches).
  * Maps come packed per side as [B, L] fp32 rows (L = sum of the maps' H*W), exactly as
    kernels.pool.pool_taps writes them: a single base pointer plus int32 offset tables
    stands in for a list of tensors, and nothing is concatenated (`pair_distances` of
    separate maps packs them with one torch.cat per side).
  * Teacher maps are grouped by size (ResNets have 3-4 distinct sizes for 8-16 taps). One
    program owns (sample b, size group g): it walks the group's positions in blocks of BLOCK,
    loads the block of all teacher maps of the group as one [MAX_GROUP, BLOCK] tile, and for
    each student map j computes the resized block r on the fly (adaptive average pooling:
    a masked gather over the pooling window, at most ceil(Hs/Ht)+1 rows and columns), then
    accumulates tt, rr[j] and tr[:, j]. So each teacher map is read once and each student map
    once per size group; no resized map is ever stored.
  * Backward, stage 1 (grid (B, G), same walk): with g = dL/dd and the saved sums,
        dL/dr_j = sum_i g_ij * (A_ij t_i) + Br_j r_j,    dL/dt_i = sum_j g_ij A_ij r_j + Bt_i t_i
    (A = -2ac/HW; Br, Bt from differentiating the normalization, see _coefficients). The
    teacher gradient is final and written directly; the student gradient w.r.t. the resized
    map r_j (per size group) goes to a buffer gr [B, m, sum_g HW_g] (map-sized, fp32).
  * Backward, stage 2 (grid (B, m)): the adjoint of adaptive average pooling as a gather:
    student position y receives gr[p] / area(p) from every output cell p whose window holds
    y, i.e. p in [floor(y Ht/Hs), ceil((y+1) Ht/Hs)) per axis, summed over the size groups.
    No atomics: deterministic.

Everything here is O(map size), ~1/C of the feature bytes that `pool` moves.

The op is two torch.library custom ops on packed maps, `fastibd::pair_distances` -> (d, stats)
and `fastibd::pair_distances_backward` (its autograd formula) -> packed gradients
[B, sum H*W] per side. They dispatch as kernels/pool.py's do; `stats` (the three sums per
pair, saved for the backward) is empty on the reference path. Use `packed_pair_distances`
(or `pair_distances` of separate maps), which return d only; outside torch.compile they
run the same host functions through a plain autograd.Function (kernels.common.eager_triton).
Double backward is not supported: differentiating a gradient raises.
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import common, reference
from kernels.common import (
    eager_triton,
    new_buffer,
    next_pow2,
    refuse_double_backward,
    tl,
    triton,
    use_triton,
)
from kernels.reference import NORMALIZE_EPS, Sizes, sizes_of

# ------------------------------------------------------------------------ device helpers


@triton.jit
def _window(o, size_in, size_out):
    """Adaptive-pooling window [start, end) of output index o (PyTorch's formula). With the
    sizes swapped it is also the set of outputs whose window holds input index o."""
    start = (o * size_in) // size_out
    end = ((o + 1) * size_in + size_out - 1) // size_out
    return start, end


@triton.jit
def _max_window(size_in, size_out):
    """Largest window length of _window: exact when one size divides the other (the common
    ResNet case: 2x2, 4x4... or pure upsampling), else the bound ceil(in/out) + 1."""
    longest = (size_in + size_out - 1) // size_out
    uneven = ((size_in % size_out) != 0) & ((size_out % size_in) != 0)
    return longest + uneven.to(tl.int32)


@triton.jit
def _resized_block(s_row, hs, ws, ht, wt, oh, ow, mask, BLOCK: tl.constexpr):
    """Adaptive average pool of the student map at s_row ([hs, ws], fp32, contiguous) to
    (ht, wt), evaluated at the output positions (oh, ow) of one block: [BLOCK] fp32."""
    h0, h1 = _window(oh, hs, ht)
    w0, w1 = _window(ow, ws, wt)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for dh in range(0, _max_window(hs, ht)):
        for dw in range(0, _max_window(ws, wt)):
            y = h0 + dh
            x = w0 + dw
            acc += tl.load(s_row + y * ws + x, mask=mask & (y < h1) & (x < w1), other=0.0)
    return acc / ((h1 - h0) * (w1 - w0)).to(tl.float32)


@triton.jit
def _group_members(groups_ptr, members_ptr, toff_ptr, g, MAX_GROUP: tl.constexpr):
    """Size group g: (ht, wt, gr_offset, member mask, teacher indices, packed offsets)."""
    ht = tl.load(groups_ptr + g * 4)
    wt = tl.load(groups_ptr + g * 4 + 1)
    count = tl.load(groups_ptr + g * 4 + 2)
    gr_off = tl.load(groups_ptr + g * 4 + 3)
    k = tl.arange(0, MAX_GROUP)
    kmask = k < count
    tidx = tl.load(members_ptr + g * MAX_GROUP + k, mask=kmask, other=0)
    toff = tl.load(toff_ptr + tidx, mask=kmask, other=0)
    return ht, wt, gr_off, kmask, tidx, toff


# --------------------------------------------------------------------------------- kernels


@triton.jit
def _this_group(t_ptr, s_ptr, groups_ptr, members_ptr, toff_ptr, LT, LS,
                MAX_GROUP: tl.constexpr):
    """The (sample b, size group g) this program owns: b, the group's size, its members and
    offsets (_group_members), and the sample's packed teacher and student rows."""
    b = tl.program_id(0)
    ht, wt, gr_off, kmask, tidx, toff = _group_members(
        groups_ptr, members_ptr, toff_ptr, tl.program_id(1), MAX_GROUP
    )
    t_row = t_ptr + b.to(tl.int64) * LT
    s_row = s_ptr + b.to(tl.int64) * LS
    return b, ht, wt, gr_off, kmask, tidx, toff, t_row, s_row


@triton.jit
def _pairs_fwd_kernel(
    t_ptr,  # [B, LT] fp32: teacher maps packed per sample
    s_ptr,  # [B, LS] fp32: student maps packed per sample
    d_ptr,  # [B, n, m] fp32 out
    stats_ptr,  # [3, B, n, m] fp32 out: tt, rr, tr (saved for the backward)
    groups_ptr,  # [G, 4] int32: ht, wt, member count, offset in the gr buffer
    members_ptr,  # [G, MAX_GROUP] int32: teacher indices of the group
    toff_ptr,  # [n] int32: offset of teacher map i in a packed row
    stab_ptr,  # [m, 3] int32: offset, hs, ws of student map j
    bnm,  # B * n * m: stride between the three stats planes
    n, m, LT, LS, eps,  # pair counts, packed row lengths, F.normalize's eps
    MAX_GROUP: tl.constexpr, MAX_M: tl.constexpr, BLOCK: tl.constexpr,
):
    b, ht, wt, _gr_off, kmask, tidx, toff, t_row, s_row = _this_group(
        t_ptr, s_ptr, groups_ptr, members_ptr, toff_ptr, LT, LS, MAX_GROUP)
    hw = ht * wt
    jj = tl.arange(0, MAX_M)
    tt = tl.zeros([MAX_GROUP], dtype=tl.float32)
    rr = tl.zeros([MAX_M], dtype=tl.float32)
    tr = tl.zeros([MAX_GROUP, MAX_M], dtype=tl.float32)
    for p0 in range(0, hw, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        pmask = p < hw
        oh = p // wt
        ow = p % wt
        tile = tl.load(t_row + toff[:, None] + p[None, :],
                       mask=kmask[:, None] & pmask[None, :], other=0.0)
        tt += tl.sum(tile * tile, axis=1)
        for j in range(0, m):
            soff = tl.load(stab_ptr + j * 3)
            hs = tl.load(stab_ptr + j * 3 + 1)
            ws = tl.load(stab_ptr + j * 3 + 2)
            r = _resized_block(s_row + soff, hs, ws, ht, wt, oh, ow, pmask, BLOCK)
            rr += tl.where(jj == j, tl.sum(r * r, axis=0), 0.0)
            dots = tl.sum(tile * r[None, :], axis=1)
            tr += tl.where(jj[None, :] == j, dots[:, None], 0.0)
    nt = tl.sqrt(tt)
    nr = tl.sqrt(rr)
    a = 1.0 / tl.maximum(nt, eps)
    c = 1.0 / tl.maximum(nr, eps)
    # |a t|^2 is exactly 1 unless the norm was clamped: using 1 avoids a rounding error that
    # would not cancel in the 2 - 2 cos difference.
    t_sq = tl.where(nt > eps, 1.0, tt * a * a)
    r_sq = tl.where(nr > eps, 1.0, rr * c * c)
    cos = tr * a[:, None] * c[None, :]
    dist = (t_sq[:, None] + r_sq[None, :] - 2.0 * cos) / hw.to(tl.float32)
    dist = tl.maximum(dist, 0.0)
    out = b.to(tl.int64) * n * m + tidx[:, None] * m + jj[None, :]
    omask = kmask[:, None] & (jj < m)[None, :]
    zero = tl.zeros([MAX_GROUP, MAX_M], dtype=tl.float32)
    tl.store(d_ptr + out, dist, mask=omask)
    tl.store(stats_ptr + out, tt[:, None] + zero, mask=omask)
    tl.store(stats_ptr + bnm + out, rr[None, :] + zero, mask=omask)
    tl.store(stats_ptr + 2 * bnm + out, tr, mask=omask)


@triton.jit
def _coefficients(stats_ptr, gd_ptr, b, bnm, n, m, tidx, kmask, hw, eps,
                  MAX_GROUP: tl.constexpr, MAX_M: tl.constexpr):
    """Backward coefficients of one size group from the saved sums and g = dL/dd:
    dL/dr_j = sum_i A_ij t_i + Br_j r_j and dL/dt_i = sum_j A_ij r_j + Bt_i t_i, where
    A = -2 g a c / HW and, differentiating a = 1/|t| (c = 1/|r|) only where it was not
    clamped, Br_j = sum_i 2 g cos c^2 / HW (2 g c^2 / HW if |r| <= eps), Bt likewise."""
    jj = tl.arange(0, MAX_M)
    jmask = jj < m
    kj = kmask[:, None] & jmask[None, :]
    row = b.to(tl.int64) * n * m + tidx[:, None] * m + jj[None, :]
    tt = tl.max(tl.load(stats_ptr + row, mask=kj, other=0.0), axis=1)  # same for every j
    rr = tl.max(tl.load(stats_ptr + bnm + row, mask=kj, other=0.0), axis=0)  # same per i
    tr = tl.load(stats_ptr + 2 * bnm + row, mask=kj, other=0.0)
    w = tl.load(gd_ptr + row, mask=kj, other=0.0) / hw.to(tl.float32)
    nt = tl.sqrt(tt)
    nr = tl.sqrt(rr)
    a = 1.0 / tl.maximum(nt, eps)
    c = 1.0 / tl.maximum(nr, eps)
    ac = a[:, None] * c[None, :]  # <= 1e24: finite in fp32, and w = 0 on masked lanes
    cos = tr * ac
    coef_a = -2.0 * w * ac
    coef_r = tl.sum(w * tl.where(nr[None, :] > eps, 2.0 * cos, 2.0) * (c * c)[None, :], axis=0)
    coef_t = tl.sum(w * tl.where(nt[:, None] > eps, 2.0 * cos, 2.0) * (a * a)[:, None], axis=1)
    return coef_a, coef_r, coef_t


@triton.jit
def _pairs_bwd_resized_kernel(
    t_ptr,  # [B, LT] fp32 packed teacher maps
    s_ptr,  # [B, LS] fp32 packed student maps
    stats_ptr,  # [3, B, n, m] fp32 from the forward
    gd_ptr,  # [B, n, m] fp32 contiguous: dL/dd
    gr_ptr,  # [B, m, LG] fp32 out: dL/d(resized student map), per size group (NEED_S)
    gt_ptr,  # [B, LT] fp32 out: dL/d(teacher maps) (NEED_T)
    groups_ptr,
    members_ptr,
    toff_ptr,
    stab_ptr,
    bnm,  # B * n * m: stride between the three stats planes
    n, m, LT, LS, LG, eps,  # as the forward's; LG: row length of gr
    NEED_T: tl.constexpr, NEED_S: tl.constexpr,
    MAX_GROUP: tl.constexpr, MAX_M: tl.constexpr, BLOCK: tl.constexpr,
):
    b, ht, wt, gr_off, kmask, tidx, toff, t_row, s_row = _this_group(
        t_ptr, s_ptr, groups_ptr, members_ptr, toff_ptr, LT, LS, MAX_GROUP)
    hw = ht * wt
    coef_a, coef_r, coef_t = _coefficients(
        stats_ptr, gd_ptr, b, bnm, n, m, tidx, kmask, hw, eps, MAX_GROUP, MAX_M
    )
    jj = tl.arange(0, MAX_M)
    for p0 in range(0, hw, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        pmask = p < hw
        oh = p // wt
        ow = p % wt
        tmask = kmask[:, None] & pmask[None, :]
        tile = tl.load(t_row + toff[:, None] + p[None, :], mask=tmask, other=0.0)
        grad_t = coef_t[:, None] * tile
        for j in range(0, m):
            soff = tl.load(stab_ptr + j * 3)
            hs = tl.load(stab_ptr + j * 3 + 1)
            ws = tl.load(stab_ptr + j * 3 + 2)
            r = _resized_block(s_row + soff, hs, ws, ht, wt, oh, ow, pmask, BLOCK)
            a_j = tl.sum(tl.where(jj[None, :] == j, coef_a, 0.0), axis=1)  # column j
            if NEED_S:
                r_j = tl.sum(tl.where(jj == j, coef_r, 0.0), axis=0)
                grad_r = tl.sum(a_j[:, None] * tile, axis=0) + r_j * r
                gr_row = gr_ptr + (b.to(tl.int64) * m + j) * LG + gr_off
                tl.store(gr_row + p, grad_r, mask=pmask)
            if NEED_T:
                grad_t += a_j[:, None] * r[None, :]
        if NEED_T:
            tl.store(gt_ptr + b.to(tl.int64) * LT + toff[:, None] + p[None, :], grad_t,
                     mask=tmask)


@triton.jit
def _pairs_bwd_student_kernel(
    gr_ptr,  # [B, m, LG] fp32 from stage 1
    gs_ptr,  # [B, LS] fp32 out: dL/d(student maps), packed
    groups_ptr,
    stab_ptr,
    G,
    m,
    LG,
    LS,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    soff = tl.load(stab_ptr + j * 3)
    hs = tl.load(stab_ptr + j * 3 + 1)
    ws = tl.load(stab_ptr + j * 3 + 2)
    gr_row = gr_ptr + (b.to(tl.int64) * m + j) * LG
    for q0 in range(0, hs * ws, BLOCK):
        q = q0 + tl.arange(0, BLOCK)
        qmask = q < hs * ws
        y = q // ws
        x = q % ws
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for g in range(0, G):
            ht = tl.load(groups_ptr + g * 4)
            wt = tl.load(groups_ptr + g * 4 + 1)
            gr_off = tl.load(groups_ptr + g * 4 + 3)
            # output cells whose pooling window holds (y, x): the window formula, swapped
            r0, r1 = _window(y, ht, hs)
            c0, c1 = _window(x, wt, ws)
            for dr in range(0, _max_window(ht, hs)):
                for dc in range(0, _max_window(wt, ws)):
                    oy = r0 + dr
                    ox = c0 + dc
                    mask = qmask & (oy < r1) & (ox < c1)
                    h0, h1 = _window(oy, hs, ht)
                    w0, w1 = _window(ox, ws, wt)
                    area = ((h1 - h0) * (w1 - w0)).to(tl.float32)
                    v = tl.load(gr_row + gr_off + oy * wt + ox, mask=mask, other=0.0)
                    acc += v / area
        tl.store(gs_ptr + b.to(tl.int64) * LS + soff + q, acc, mask=qmask)


# ---------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class PairPlan:
    """Offset tables of one (teacher sizes, student sizes, device) combination (cached)."""

    n: int
    m: int
    num_groups: int
    t_len: int  # LT: packed teacher row length
    s_len: int  # LS
    g_len: int  # LG: sum of the distinct teacher sizes' H*W
    max_group: int  # MAX_GROUP (power of two)
    max_m: int  # MAX_M (power of two)
    block: int  # positions per step, stage 1 / forward
    block_s: int  # positions per step, stage 2
    groups: Tensor  # [G, 4] int32
    members: Tensor  # [G, MAX_GROUP] int32
    t_offsets: Tensor  # [n] int32
    s_table: Tensor  # [m, 3] int32


@functools.lru_cache(maxsize=64)
def pair_plan(t_sizes: tuple[tuple[int, int], ...], s_sizes: tuple[tuple[int, int], ...],
              device: torch.device) -> PairPlan:
    """Tables for the kernels, built once per shape combination and kept on the device (no
    host-to-device copy per step)."""
    t_offsets, offset = [], 0
    for h, w in t_sizes:
        t_offsets.append(offset)
        offset += h * w
    t_len = offset
    s_rows, offset = [], 0
    for h, w in s_sizes:
        s_rows.append((offset, h, w))
        offset += h * w
    s_len = offset
    sizes = list(dict.fromkeys(t_sizes))  # distinct teacher sizes, first-seen order
    members = [[i for i, size in enumerate(t_sizes) if size == key] for key in sizes]
    max_group = next_pow2(max(len(x) for x in members))
    groups, g_off = [], 0
    for (h, w), idx in zip(sizes, members, strict=True):
        groups.append((h, w, len(idx), g_off))
        g_off += h * w
    member_table = [idx + [0] * (max_group - len(idx)) for idx in members]
    max_hw = max(h * w for h, w in sizes)
    # Forward tile is [MAX_GROUP, BLOCK]: keep it <= 2048 fp32 values.
    block = min(next_pow2(max_hw), max(16, 2048 // max_group))
    block_s = min(next_pow2(max(h * w for h, w in s_sizes)), 256)

    def table(rows: list) -> Tensor:
        return torch.tensor(rows, dtype=torch.int32).to(device)

    return PairPlan(
        n=len(t_sizes), m=len(s_sizes), num_groups=len(sizes), t_len=t_len, s_len=s_len,
        g_len=g_off, max_group=max_group, max_m=next_pow2(len(s_sizes)), block=block,
        block_s=block_s, groups=table(groups), members=table(member_table),
        t_offsets=table(t_offsets), s_table=table(s_rows),
    )


def _pairs(flat: Sequence[int]) -> Sizes:
    """[h0, w0, h1, w1, ...] (a custom op's int[]) -> ((h0, w0), (h1, w1), ...)."""
    return tuple(zip(flat[::2], flat[1::2], strict=True))


@functools.lru_cache(maxsize=64)
def _packed_lengths(t_sizes: Sizes, s_sizes: Sizes) -> tuple[int, int]:
    return sum(h * w for h, w in t_sizes), sum(h * w for h, w in s_sizes)


def _flat(sizes: Sizes) -> list[int]:
    return [int(v) for size in sizes for v in size]


def pack(maps: Sequence[Tensor]) -> Tensor:
    """n maps [B, H_i, W_i] -> one [B, sum_i H_i W_i] tensor in the accumulation dtype (one
    torch.cat, differentiable)."""
    batch, dtype = maps[0].shape[0], reference.accumulation_dtype(*maps)
    return torch.cat([x.reshape(batch, -1).to(dtype) for x in maps], dim=1)


def _packed_rows(x: Tensor) -> Tensor:
    """fp32 [B, L], contiguous (the kernels find row b at b * L): a no-op for pool's maps, a
    copy for a column slice or a batch step of a larger tensor."""
    # attributes first: a no-op .to() or .contiguous() still costs a dispatch (~1 us)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x if x.is_contiguous() else x.contiguous()


def pairs_fwd(t_packed: Tensor, s_packed: Tensor, t_sizes: Sizes, s_sizes: Sizes,
              plan: PairPlan | None = None, poison: bool | None = None
              ) -> tuple[Tensor, Tensor]:
    """Triton forward. t_packed: [B, sum Ht_i Wt_i] (n teacher maps of sizes t_sizes, packed
    as kernels.pool.pool_taps packs them); s_packed likewise; any float dtype except float64,
    on CUDA (or CPU under TRITON_INTERPRET=1).

    Returns (d [B, n, m] fp32, stats [3, B, n, m] fp32 = |t|^2, |r|^2, <t, r> per pair),
    stats being what `pairs_bwd` needs. `plan`: these sizes' pair_plan when the caller has
    it; `poison`: common.poison_enabled() when the caller has read it."""
    plan = plan or pair_plan(tuple(t_sizes), tuple(s_sizes), t_packed.device)
    batch, device = t_packed.shape[0], t_packed.device
    t_packed, s_packed = _packed_rows(t_packed), _packed_rows(s_packed)
    poison = common.poison_enabled() if poison is None else poison
    d = new_buffer((batch, plan.n, plan.m), torch.float32, device, poison)
    stats = new_buffer((3, batch, plan.n, plan.m), torch.float32, device, poison)
    if batch > 0:
        _pairs_fwd_kernel[(batch, plan.num_groups)](
            t_packed, s_packed, d, stats, plan.groups, plan.members, plan.t_offsets,
            plan.s_table, batch * plan.n * plan.m, plan.n, plan.m, plan.t_len, plan.s_len,
            NORMALIZE_EPS,
            MAX_GROUP=plan.max_group, MAX_M=plan.max_m, BLOCK=plan.block, num_warps=4,
        )
    return d, stats


def pairs_bwd(grad_d: Tensor, t_packed: Tensor, s_packed: Tensor, t_sizes: Sizes,
              s_sizes: Sizes, stats: Tensor, need_t: bool, need_s: bool,
              plan: PairPlan | None = None, poison: bool | None = None
              ) -> tuple[Tensor, Tensor]:
    """Triton backward. grad_d: [B, n, m]; stats: from `pairs_fwd`; `plan`, `poison` as
    pairs_fwd's.

    Returns (gt [B, LT], gs [B, LS]): fp32 gradients w.r.t. the packed teacher / student maps,
    each an empty [0] tensor when not asked for. The teacher gradient costs one extra store
    per teacher position."""
    plan = plan or pair_plan(tuple(t_sizes), tuple(s_sizes), t_packed.device)
    batch, device = t_packed.shape[0], t_packed.device
    empty = torch.empty((0,), dtype=torch.float32, device=device)
    if batch == 0 or not (need_t or need_s):
        gt = torch.zeros((batch, plan.t_len), device=device) if need_t else empty
        gs = torch.zeros((batch, plan.s_len), device=device) if need_s else empty
        return gt, gs
    t_packed, s_packed = _packed_rows(t_packed), _packed_rows(s_packed)
    gd = grad_d if grad_d.dtype == torch.float32 else grad_d.to(torch.float32)
    gd = gd if gd.is_contiguous() else gd.contiguous()
    stats = stats if stats.is_contiguous() else stats.contiguous()
    poison = common.poison_enabled() if poison is None else poison
    gt = new_buffer((batch, plan.t_len), torch.float32, device, poison) if need_t else empty
    gr = (new_buffer((batch, plan.m, plan.g_len), torch.float32, device, poison) if need_s
          else empty)
    _pairs_bwd_resized_kernel[(batch, plan.num_groups)](
        t_packed, s_packed, stats, gd, gr if need_s else t_packed, gt if need_t else t_packed,
        plan.groups, plan.members, plan.t_offsets, plan.s_table, batch * plan.n * plan.m,
        plan.n, plan.m,
        plan.t_len, plan.s_len, plan.g_len, NORMALIZE_EPS,
        NEED_T=need_t, NEED_S=need_s, MAX_GROUP=plan.max_group, MAX_M=plan.max_m,
        BLOCK=plan.block, num_warps=4,
    )
    if not need_s:
        return gt, empty
    gs = new_buffer((batch, plan.s_len), torch.float32, device, poison)
    _pairs_bwd_student_kernel[(batch, plan.m)](
        gr, gs, plan.groups, plan.s_table, plan.num_groups, plan.m, plan.g_len, plan.s_len,
        BLOCK=plan.block_s, num_warps=4,
    )
    return gt, gs


# ------------------------------------------------------------- the op: dispatch, autograd


@torch.library.custom_op(
    "fastibd::pair_distances",
    mutates_args=(),
    schema="(Tensor t_packed, Tensor s_packed, int[] t_sizes, int[] s_sizes) -> (Tensor, Tensor)",
)
def pair_distances_op(t_packed: Tensor, s_packed: Tensor, t_sizes: list[int],
                      s_sizes: list[int]) -> tuple[Tensor, Tensor]:
    """(d [B, n, m], stats) of packed maps; sizes flattened as [h0, w0, h1, w1, ...]. d as
    kernels.reference.packed_pair_distances; stats is [3, B, n, m] on the Triton path (saved
    for its backward) and an empty tensor on the reference path."""
    if use_triton([t_packed, s_packed]):
        return pairs_fwd(t_packed, s_packed, _pairs(t_sizes), _pairs(s_sizes))
    d = reference.packed_pair_distances(t_packed, s_packed, _pairs(t_sizes), _pairs(s_sizes))
    return d, d.new_empty((0,))


@pair_distances_op.register_fake
def _pair_distances_fake(t_packed: Tensor, s_packed: Tensor, t_sizes: list[int],
                         s_sizes: list[int]) -> tuple[Tensor, Tensor]:
    dtype = reference.accumulation_dtype(t_packed, s_packed)
    batch, n, m = t_packed.shape[0], len(t_sizes) // 2, len(s_sizes) // 2
    d = t_packed.new_empty((batch, n, m), dtype=dtype)
    if use_triton([t_packed, s_packed]):
        return d, t_packed.new_empty((3, batch, n, m), dtype=torch.float32)
    return d, t_packed.new_empty((0,), dtype=dtype)


def pairs_backward_torch(grad_d: Tensor, t_packed: Tensor, s_packed: Tensor, t_sizes: Sizes,
                         s_sizes: Sizes, need_t: bool, need_s: bool) -> tuple[Tensor, Tensor]:
    """The backward of kernels.reference.pair_distances in plain torch (the reference path of
    fastibd::pair_distances_backward; a custom op runs below autograd, so it cannot call
    autograd on the reference). Same formula as the Triton kernels (kernels/pairs.py), per
    teacher size group, with the adjoint of adaptive pooling done by ATen's own backward op.
    Returns packed gradients like pairs_bwd, in the accumulation dtype."""
    dtype = reference.accumulation_dtype(t_packed, s_packed)
    eps = reference.NORMALIZE_EPS
    batch = t_packed.shape[0]
    t_list = reference.unpack_maps(t_packed.to(dtype), t_sizes)
    s_list = reference.unpack_maps(s_packed.to(dtype), s_sizes)
    g_t = [torch.zeros_like(x) for x in t_list]
    g_s = [torch.zeros_like(x) for x in s_list]
    grad_d = grad_d.to(dtype)
    for size in dict.fromkeys(t_sizes):
        idx = [i for i, x in enumerate(t_sizes) if tuple(x) == tuple(size)]
        hw = size[0] * size[1]
        t = torch.stack([t_list[i] for i in idx], dim=1).flatten(2)  # [B, k, HW]
        r = torch.stack(
            [torch.nn.functional.adaptive_avg_pool2d(x.unsqueeze(1), size).squeeze(1)
             for x in s_list], dim=1).flatten(2)  # [B, m, HW], not normalized
        nt, nr = t.square().sum(-1).sqrt(), r.square().sum(-1).sqrt()  # [B, k], [B, m]
        a, c = 1.0 / nt.clamp_min(eps), 1.0 / nr.clamp_min(eps)
        ac = a[:, :, None] * c[:, None, :]  # [B, k, m]
        cos = (t @ r.transpose(1, 2)) * ac
        w = grad_d[:, idx, :] / hw
        coef_a = -2.0 * w * ac
        # differentiate a = 1/|t| (c = 1/|r|) only where the norm was not clamped at eps
        coef_r = (w * torch.where(nr[:, None, :] > eps, 2.0 * cos, 2.0) * c[:, None, :] ** 2)
        coef_t = (w * torch.where(nt[:, :, None] > eps, 2.0 * cos, 2.0) * a[:, :, None] ** 2)
        if need_s:
            g_r = coef_a.transpose(1, 2) @ t + coef_r.sum(1)[:, :, None] * r  # [B, m, HW]
            for j, x in enumerate(s_list):
                g_rj = g_r[:, j].reshape(batch, 1, *size)
                g_s[j] += torch.ops.aten._adaptive_avg_pool2d_backward(
                    g_rj, x.unsqueeze(1)).squeeze(1)
        if need_t:
            g_tk = coef_a @ r + coef_t.sum(2)[:, :, None] * t  # [B, k, HW]
            for k, i in enumerate(idx):
                g_t[i] = g_tk[:, k].reshape(t_list[i].shape)
    empty = grad_d.new_empty((0,), dtype=dtype)
    gt = torch.cat([g.reshape(batch, -1) for g in g_t], 1) if need_t else empty
    gs = torch.cat([g.reshape(batch, -1) for g in g_s], 1) if need_s else empty
    return gt, gs


@torch.library.custom_op(
    "fastibd::pair_distances_backward",
    mutates_args=(),
    schema="(Tensor grad_d, Tensor t_packed, Tensor s_packed, int[] t_sizes, int[] s_sizes, "
    "Tensor stats, bool need_t, bool need_s) -> (Tensor, Tensor)",
)
def pair_distances_backward_op(grad_d: Tensor, t_packed: Tensor, s_packed: Tensor,
                               t_sizes: list[int], s_sizes: list[int], stats: Tensor,
                               need_t: bool, need_s: bool) -> tuple[Tensor, Tensor]:
    """Packed gradients (gt [B, sum Ht*Wt], gs [B, sum Hs*Ws]) in the accumulation dtype;
    a side not asked for is an empty [0] tensor."""
    if use_triton([t_packed, s_packed]):
        return pairs_bwd(grad_d, t_packed, s_packed, _pairs(t_sizes), _pairs(s_sizes), stats,
                         need_t, need_s)
    return pairs_backward_torch(grad_d, t_packed, s_packed, _pairs(t_sizes), _pairs(s_sizes),
                                need_t, need_s)


@pair_distances_backward_op.register_fake
def _pair_distances_backward_fake(grad_d: Tensor, t_packed: Tensor, s_packed: Tensor,
                                  t_sizes: list[int], s_sizes: list[int], stats: Tensor,
                                  need_t: bool, need_s: bool) -> tuple[Tensor, Tensor]:
    dtype = reference.accumulation_dtype(t_packed, s_packed)
    if use_triton([t_packed, s_packed]):
        dtype = torch.float32
    empty = grad_d.new_empty((0,), dtype=dtype)
    gt = t_packed.new_empty(t_packed.shape, dtype=dtype) if need_t else empty
    gs = s_packed.new_empty(s_packed.shape, dtype=dtype) if need_s else empty
    return gt, gs


def _pairs_setup_context(ctx, inputs, output) -> None:
    t_packed, s_packed, t_sizes, s_sizes = inputs
    _, stats = output
    ctx.sizes = (t_sizes, s_sizes)
    ctx.save_for_backward(t_packed, s_packed, stats)
    ctx.set_materialize_grads(False)


def _map_grads(backward, grad_d: Tensor | None, t_packed: Tensor, s_packed: Tensor,
               sizes: tuple, stats: Tensor, need_t: bool, need_s: bool) -> tuple:
    """The autograd formula of the pair distances, for both wirings: the packed gradients,
    in the inputs' dtypes (fp32 from pool_taps; fp16/bf16 packed by a caller)."""
    if grad_d is None or not (need_t or need_s):
        return None, None, None, None
    gt, gs = backward(grad_d, t_packed, s_packed, *sizes, stats, need_t, need_s)
    return (gt.to(t_packed.dtype) if need_t else None,
            gs.to(s_packed.dtype) if need_s else None, None, None)


def _pairs_backward(ctx, grad_d: Tensor | None, _grad_stats: Tensor | None):
    return _map_grads(pair_distances_backward_op, grad_d, *ctx.saved_tensors[:2], ctx.sizes,
                      ctx.saved_tensors[2], *ctx.needs_input_grad[:2])


pair_distances_op.register_autograd(_pairs_backward, setup_context=_pairs_setup_context)


class _EagerPairDistances(torch.autograd.Function):
    """pair_distances_op's Triton path with the same autograd formula, minus torch.library's
    Python dispatch (see kernels.common.eager_triton); returns d only."""

    @staticmethod
    def forward(ctx, t_packed: Tensor, s_packed: Tensor, t_sizes: Sizes, s_sizes: Sizes
                ) -> Tensor:
        d, stats = pairs_fwd(t_packed, s_packed, t_sizes, s_sizes)
        ctx.save_for_backward(t_packed, s_packed, stats)
        ctx.sizes = (t_sizes, s_sizes)
        return d

    @staticmethod
    def backward(ctx, grad_d: Tensor | None):
        refuse_double_backward("pair_distances")
        t_packed, s_packed, stats = ctx.saved_tensors
        return _map_grads(pairs_bwd, grad_d, t_packed, s_packed, ctx.sizes, stats,
                          *ctx.needs_input_grad[:2])


# ----------------------------------------------------------------------- the public ops


def packed_pair_distances(t_packed: Tensor, s_packed: Tensor, t_sizes: Sizes, s_sizes: Sizes
                          ) -> Tensor:
    """Distances between every teacher map and every student map (one launch on CUDA), from
    packed maps: t_packed [B, sum Ht_i Wt_i] holding n maps of the (H, W) sizes t_sizes (the
    `maps` of kernels.pool.pool_taps), s_packed likewise. Returns d [B, n, m] fp32 (float64
    for float64 maps); see kernels.reference.packed_pair_distances. Differentiable w.r.t. both
    sides (the teacher gradient is only computed when asked)."""
    if len(t_sizes) == 0 or len(s_sizes) == 0:
        raise ValueError("pair_distances needs at least one teacher map and one student map")
    t_sizes, s_sizes = tuple(map(tuple, t_sizes)), tuple(map(tuple, s_sizes))
    lengths = _packed_lengths(t_sizes, s_sizes)
    for packed, sizes, length in ((t_packed, t_sizes, lengths[0]),
                                  (s_packed, s_sizes, lengths[1])):
        if packed.dim() != 2 or packed.shape[1] != length or \
                packed.shape[0] != t_packed.shape[0]:
            raise ValueError(
                f"pair_distances expects packed [B, sum H*W] maps with one batch size, got "
                f"{tuple(packed.shape)} for sizes {list(sizes)}")
    if eager_triton([t_packed, s_packed]):
        return _EagerPairDistances.apply(t_packed, s_packed, t_sizes, s_sizes)
    d, _stats = pair_distances_op(t_packed, s_packed, _flat(t_sizes), _flat(s_sizes))
    return d


def pair_distances(t_maps: Sequence[Tensor], s_maps: Sequence[Tensor]) -> Tensor:
    """packed_pair_distances of separate maps [B, H, W] (packed here with one torch.cat per
    side): t_maps n maps [B, Ht_i, Wt_i], s_maps m maps [B, Hs_j, Ws_j], any sizes. Returns
    d [B, n, m]; see kernels.reference.pair_distances."""
    if len(t_maps) == 0 or len(s_maps) == 0:
        raise ValueError("pair_distances needs at least one teacher map and one student map")
    maps = [*t_maps, *s_maps]
    if any(x.dim() != 3 for x in maps) or len({x.shape[0] for x in maps}) != 1:
        raise ValueError(
            "pair_distances expects [B, H, W] maps with one batch size, got shapes "
            f"{[tuple(x.shape) for x in maps]}"
        )
    return packed_pair_distances(pack(t_maps), pack(s_maps), sizes_of(t_maps), sizes_of(s_maps))

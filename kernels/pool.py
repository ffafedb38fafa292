"""Triton kernels of the `pool` op: channel-pooled energy map and GAP of every tap of a model,
in one pass over each tap and one launch for all of them.

    forward   taps z_t [B, C_t, H_t, W_t]  ->  maps [B, sum_t H_t W_t]  (map_t = mean_c z_t^2)
                                                gaps [B, sum_t C_t]      (gap_t = mean_hw z_t)
    backward  dz_t = 2 z_t / C_t * g_map_t[:, None] + g_gap_t[:, :, None, None] / (H_t W_t)

The maps come out packed per sample in tap order: exactly the [B, L] rows kernels/pairs.py
reads, so nothing is concatenated forward or backward. Every tap is read once (the backward
also writes dz once); the only other traffic is the fp32 maps / gaps (1/C and 1/HW of z) and
a small per-block GAP partial (see below).

Blocking. One program owns one sample b and one block of BLOCK_HW spatial positions of one
tap, and loops over the tap's channels in blocks of BLOCK_C, loading [BLOCK_HW, BLOCK_C]
tiles. Its map entries are complete when the loop ends (no cross-program reduction for the
map). The GAP needs a sum over all spatial blocks of a tap: each program writes its block's
partial channel sums to a packed partials row, and one small launch (`_gap_reduce_kernel`,
all taps at once) adds them up. No atomics: the result is deterministic. When every tap fits
one spatial block the partials already are the GAP and that launch is skipped.

Grouping. The work items (tap, spatial block) of all taps form the second grid axis; a table
on the device gives each tap's channels, size, batch stride and offsets in the packed rows,
and the taps themselves are passed as one tuple of pointers (Triton specializes a tuple
argument like separate ones: each pointer keeps its 16-byte alignment). A launch covers the
taps of one dtype and one memory format whose alignment is alike (ALIGNED below), so mixed
dtypes or layouts cost one launch each (training, channels_last on CUDA, makes one). The
tables are built once per shape signature and kept on the device (`pool_plan`): no
host-to-device copy per step, nothing that stops a CUDA graph. Small maps share the grid
with the large ones: no launch of a few hundred programs is left to starve the GPU.

Memory formats. Within a sample, z must be NCHW-dense (offset c*HW + hw) or channels_last-
dense (offset hw*C + c); the batch stride is free (a batch slice is read in place). The
CHANNELS_LAST constexpr picks the offset formula, so the unit-stride axis is known at compile
time and loads along it coalesce (C for channels_last, H*W for NCHW). ALIGNED says that
axis's length and every batch stride of the launch are multiples of 16 elements, so the
loads are vectorized as the JIT would vectorize them with the sizes as arguments. Any other
layout is copied once to the nearest dense format. dz is written in z's format.

All arithmetic is fp32 after the load (bf16/fp16 inputs), as the reference does.

The op is two torch.library custom ops, `fastibd::pool_taps` and `fastibd::pool_taps_backward`
(its autograd formula), with fake functions, so torch.compile(fullgraph=True) traces through
them. Each dispatches inside (kernels.common.use_triton): these kernels for fp32/fp16/bf16
tensors on CUDA (or on the CPU under TRITON_INTERPRET=1), the eager reference otherwise.
Outside torch.compile, a call that takes the kernels runs the same host functions and
formula through a plain autograd.Function (kernels.common.eager_triton): torch.library's
Python dispatch costs more host time than everything else the op does.
Autocast passes inputs through unchanged; outputs are fp32 (float64 stays float64).
"""

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import reference
from kernels.common import (
    eager_triton,
    new_buffer,
    next_pow2,
    poison_enabled,
    refuse_double_backward,
    tl,
    triton,
    use_triton,
)

REDUCE_BLOCK = 256  # channels per program of the GAP reduction

# --------------------------------------------------------------------------------- kernels


@triton.jit
def _select(ptrs, i, N_TAPS: tl.constexpr):
    """ptrs[i] for a runtime index i (a tuple is indexed by constants only)."""
    p = ptrs[0]
    for k in tl.static_range(1, N_TAPS):
        if i == k:
            p = ptrs[k]
    return p


@triton.jit
def _work_item(zs, taps_ptr, work_ptr, N_TAPS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
               ALIGNED: tl.constexpr, BLOCK_HW: tl.constexpr):
    """What this program owns: sample b (int64: B*C*H*W exceeds 2**31 for large ImageNet
    batches) and one spatial block of one tap. Returns b, the tap t, its C and H*W, the
    sample's row of the tap, the block's positions hw and mask, 1 / (H*W), and the tap's
    map, partials (this block's) and gap offsets in the packed rows."""
    b = tl.program_id(0).to(tl.int64)
    item = tl.program_id(1)
    t = tl.load(work_ptr + 2 * item)
    blk = tl.load(work_ptr + 2 * item + 1)
    row = taps_ptr + t * 6
    C = tl.load(row)
    HW = tl.load(row + 1)
    stride_b = tl.load(row + 2)
    if ALIGNED:  # what the JIT would know of C, H*W and the strides as integer arguments
        stride_b = tl.multiple_of(stride_b, 16)
        if CHANNELS_LAST:
            C = tl.multiple_of(C, 16)
        else:
            HW = tl.multiple_of(HW, 16)
    z_row = _select(zs, t, N_TAPS) + b * stride_b
    hw = blk * BLOCK_HW + tl.arange(0, BLOCK_HW)
    # flat return values (no nested tuple): what every Triton version's codegen unpacks
    return (b, t, C, HW, z_row, hw, hw < HW, 1.0 / HW.to(tl.float32), tl.load(row + 3),
            tl.load(row + 4) + blk * C, tl.load(row + 5))


@triton.jit
def _tile(hw, hw_mask, c0, C, HW, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels c0 .. c0+BLOCK_C of the positions hw: (c, c_mask, element offsets within the
    sample, tile mask), for either memory format."""
    c = c0 + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if CHANNELS_LAST:
        offs = hw[:, None] * C + c[None, :]
    else:
        offs = c[None, :] * HW + hw[:, None]
    return c, c_mask, offs, hw_mask[:, None] & c_mask[None, :]


@triton.jit
def _pool_fwd_kernel(
    zs,  # tuple of N_TAPS taps [B, C, H, W], each per-sample dense (NCHW or channels_last)
    taps_ptr,  # [N_TAPS, 6] int32: C, H*W, batch stride, map, partials and gap offsets
    work_ptr,  # [n_work, 2] int32: (tap, spatial block) per program
    maps_ptr,  # [B, L] fp32: packed maps
    parts_ptr,  # [B, P] fp32: packed per-block GAP partials, already divided by H*W
    L,
    P,
    N_TAPS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b, _, C, HW, z_row, hw, hw_mask, inv_hw, map_off, part_off, _ = _work_item(
        zs, taps_ptr, work_ptr, N_TAPS, CHANNELS_LAST, ALIGNED, BLOCK_HW)
    part_row = parts_ptr + b * P + part_off  # this block's partials
    energy = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c, c_mask, offs, mask = _tile(hw, hw_mask, c0, C, HW, CHANNELS_LAST, BLOCK_C)
        x = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        energy += tl.sum(x * x, axis=1)
        tl.store(part_row + c, tl.sum(x, axis=0) * inv_hw, mask=c_mask)
    tl.store(maps_ptr + b * L + map_off + hw, energy / C.to(tl.float32), mask=hw_mask)


@triton.jit
def _gap_reduce_kernel(
    parts_ptr,  # [B, P] fp32 from the forward
    gaps_ptr,  # [B, CG] fp32 out: packed GAPs
    items_ptr,  # [n_items, 5] int32: partials offset, blocks, C, first channel, gap offset
    P,
    CG,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = items_ptr + tl.program_id(1) * 5
    part_off = tl.load(row)
    n_blocks = tl.load(row + 1)
    C = tl.load(row + 2)
    c = tl.load(row + 3) + tl.arange(0, BLOCK)
    mask = c < C
    src = parts_ptr + b * P + part_off + c
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n_blocks):  # in block order: deterministic
        acc += tl.load(src + k * C, mask=mask, other=0.0)
    tl.store(gaps_ptr + b * CG + tl.load(row + 4) + c, acc, mask=mask)


@triton.jit
def _pool_bwd_kernel(
    zs,  # tuple of taps, as in the forward
    dzs,  # tuple of dz, one per tap: z's shape, dtype and within-sample layout, dense
    taps_ptr,
    work_ptr,
    gmap_ptr,  # [B, L] (rows contiguous, batch stride stride_gmb), any float dtype
    ggap_ptr,  # [B, CG] (rows contiguous, batch stride stride_ggb), any float dtype
    stride_gmb, stride_ggb,
    HAS_GMAP: tl.constexpr, HAS_GGAP: tl.constexpr,  # False: that gradient is zero, not read
    N_TAPS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, t, C, HW, z_row, hw, hw_mask, inv_hw, map_off, _, gap_off = _work_item(
        zs, taps_ptr, work_ptr, N_TAPS, CHANNELS_LAST, ALIGNED, BLOCK_HW)
    dz_row = _select(dzs, t, N_TAPS) + b * (C * HW).to(tl.int64)
    if HAS_GMAP:  # loaded once, reused for every channel block
        gm = tl.load(gmap_ptr + b * stride_gmb + map_off + hw, mask=hw_mask, other=0.0)
        gm = gm.to(tl.float32) * (2.0 / C.to(tl.float32))
    for c0 in range(0, C, BLOCK_C):
        c, c_mask, offs, mask = _tile(hw, hw_mask, c0, C, HW, CHANNELS_LAST, BLOCK_C)
        grad = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        if HAS_GMAP:
            x = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            grad += x * gm[:, None]
        if HAS_GGAP:
            gg = tl.load(ggap_ptr + b * stride_ggb + gap_off + c, mask=c_mask, other=0.0)
            grad += gg.to(tl.float32)[None, :] * inv_hw
        tl.store(dz_row + offs, grad.to(dz_row.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- host side


def sample_layout(z: Tensor) -> bool | None:
    """Within-sample layout of z [B, C, H, W]: False = NCHW-dense, True = channels_last-
    dense, None = neither (then it must be copied). Size-1 dimensions match any stride, so a
    tensor dense in both formats reports NCHW."""
    _, c, h, w = z.shape
    _, sc, sh, sw = z.stride()

    def fits(size: int, stride: int, want: int) -> bool:
        return size == 1 or stride == want

    if fits(c, sc, h * w) and fits(h, sh, w) and fits(w, sw, 1):
        return False
    if fits(c, sc, 1) and fits(h, sh, w * c) and fits(w, sw, c):
        return True
    return None


def _copy_format(z: Tensor) -> torch.memory_format:
    """The memory format a dense copy of z gets: channels_last when channels are z's unit
    stride, as torch would suggest."""
    return torch.channels_last if z.stride(1) == 1 else torch.contiguous_format


def dense_sample_layout(z: Tensor) -> tuple[Tensor, bool]:
    """(z, channels_last) with z per-sample dense; copies only a layout the kernels cannot
    index (e.g. a channel slice), to the memory format torch suggests for it."""
    layout = sample_layout(z)
    if layout is None:
        z = z.contiguous(memory_format=_copy_format(z))
        layout = sample_layout(z)
        assert layout is not None
    return z, layout


def dz_memory_format(z: Tensor) -> torch.memory_format | None:
    """The layout of dz for tap z, one rule for the Triton path, the torch path and the
    custom op's fake (torch.compile checks the strides a fake promises): None = z's own
    strides, when z is dense and the kernels index it in place; otherwise dense in the
    format z's copy gets (a batch slice, a channel slice, a permuted tap)."""
    _, c, h, w = z.shape
    if z.stride(0) == c * h * w and sample_layout(z) is not None:
        return None
    return _copy_format(z)


# Taps of at most this many positions (8x8: ImageNet's 7x7 and 5x5, CIFAR's 8x8 and 4x4)
# are the ones a tile of their own changes: from 10x10 up, next_pow2(H*W) is >= 128, the
# default tile's BLOCK_HW already.
SMALL_HW = 64


def pool_blocks(channels: int, hw: int, channels_last: bool, small_maps: bool = False
                ) -> tuple[int, int, int]:
    """(BLOCK_HW, BLOCK_C, num_warps) for taps of up to `channels` channels and `hw`
    positions.

    The tile's unit-stride axis gets at least 32 elements (>= 64 contiguous bytes in bf16,
    two full 32-byte sectors), the tile holds <= 4096 elements (16 fp32 registers per
    thread at 8 warps), and in channels_last BLOCK_HW is large (128) so the GAP partials
    stay ~3% of the bytes of z. Untuned: see docs/benchmarks/README.md. `small_maps` (taps
    of <= SMALL_HW positions launched apart, see pool_plan): in channels_last one block
    holds all positions of the group's largest tap and the rest of the 4096 elements go to
    channels (7x7: 64 x 64, 5x5: 32 x 128): fewer masked rows than a tile of 128 positions."""
    if channels_last and small_maps:
        block_hw = next_pow2(hw)
        block_c = min(next_pow2(channels), 4096 // block_hw)  # >= 64: hw <= SMALL_HW
    elif channels_last:
        block_c = min(next_pow2(channels), 32)
        block_hw = min(next_pow2(hw), 4096 // block_c)
    else:
        block_hw = min(next_pow2(hw), 256)
        block_c = min(next_pow2(channels), max(1, 4096 // block_hw))
    num_warps = 8 if block_hw * block_c >= 4096 else 4
    return block_hw, block_c, num_warps


@dataclass(frozen=True)
class PoolGroup:
    """One launch: the taps of one dtype, memory format and alignment (and size class, when
    small maps go apart)."""

    taps: tuple[int, ...]  # indices into the tap list
    channels_last: bool
    aligned: bool  # ALIGNED: see the module docstring
    block_hw: int
    block_c: int
    num_warps: int
    n_work: int  # programs per sample
    tap_table: Tensor  # [len(taps), 6] int32, as _pool_fwd_kernel reads it (a sample's size
    # fits; b * stride is formed in int64 in the kernels)
    work: Tensor  # [n_work, 2] int32

    def pick(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """This launch's taps (or their gradients) from the side's list, as the kernel's
        tuple argument."""
        if len(self.taps) == len(tensors):  # one launch for the side (the usual case)
            return tuple(tensors)  # (the indices are then 0, 1, ..., n - 1)
        return tuple([tensors[i] for i in self.taps])


@dataclass(frozen=True)
class PoolPlan:
    """The launches and packed-row layout of one tap signature (cached by `pool_plan`)."""

    sizes: tuple[tuple[int, int], ...]  # (H, W) per tap: the maps in a packed row
    maps_len: int  # L = sum H*W
    parts_len: int  # P = sum (spatial blocks * C)
    gaps_len: int  # CG = sum C
    copy: tuple[int, ...]  # taps the kernels cannot index in place (copied each call)
    # per tap, the memory format dz is allocated in (dz_memory_format of the tap)
    dz_formats: tuple[torch.memory_format | None, ...]
    groups: tuple[PoolGroup, ...]
    reduce: Tensor | None  # [n_items, 5] int32 (_gap_reduce_kernel); None: partials = GAPs


_SHAPE_AND_DTYPE = operator.attrgetter("shape", "dtype")


def tap_signature(taps: Sequence[Tensor]) -> tuple:
    """What a plan depends on: each tap's shape, strides and dtype (hashable)."""
    # map over C-level getters: a third faster than a Python loop over the taps, and this
    # runs on every call of the ops
    return tuple(map(_SHAPE_AND_DTYPE, taps)), tuple(map(Tensor.stride, taps))


@functools.lru_cache(maxsize=64)
def _plan(key: tuple, device: torch.device, block_hw: int | None,
          block_c: int | None, small_maps_apart: bool) -> PoolPlan:
    signature = [(shape, stride, dtype) for (shape, dtype), stride in zip(*key, strict=True)]
    # Per tap: (copied, channels_last, batch stride) once the kernels can index it, and
    # whether its unit-stride axis and batch stride are multiples of 16 elements.
    layouts, kinds, dz_formats = [], {}, []
    for i, (shape, stride, dtype) in enumerate(signature):
        z = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        dense, channels_last = dense_sample_layout(z)
        dz_formats.append(dz_memory_format(z))
        _, c, h, w = shape
        aligned = (c if channels_last else h * w) % 16 == 0 and dense.stride(0) % 16 == 0
        layouts.append((dense is not z, channels_last, dense.stride(0)))
        small = small_maps_apart and h * w <= SMALL_HW
        # one launch per kind: the constexprs (and the tuple's pointer type) are shared
        kinds.setdefault((dtype, channels_last, aligned, small), []).append(i)
    blocks_of = {}
    for (_, channels_last, _, small), members in kinds.items():
        auto = pool_blocks(max(signature[i][0][1] for i in members),
                           max(signature[i][0][2] * signature[i][0][3] for i in members),
                           channels_last, small)
        blocks_of.update({i: (block_hw or auto[0], block_c or auto[1], auto[2])
                          for i in members})
    offsets, reduce_rows = [], []  # per tap: (map, partials, gap) offsets in packed rows
    maps_len = parts_len = gaps_len = 0
    one_block = True  # every tap fits one spatial block: its partials are its GAPs
    for i, ((_, c, h, w), _, _) in enumerate(signature):
        n_blocks = triton.cdiv(h * w, blocks_of[i][0])
        one_block = one_block and n_blocks == 1
        offsets.append((maps_len, parts_len, gaps_len))
        reduce_rows += [(parts_len, n_blocks, c, c0, gaps_len)
                        for c0 in range(0, c, REDUCE_BLOCK)]
        maps_len, parts_len, gaps_len = maps_len + h * w, parts_len + n_blocks * c, gaps_len + c
    groups = []
    for (_, channels_last, aligned, _), members in kinds.items():
        rows, work = [], []
        for local, i in enumerate(members):
            (_, c, h, w), _, _ = signature[i]
            rows.append((c, h * w, layouts[i][2], *offsets[i]))
            work += [(local, k) for k in range(triton.cdiv(h * w, blocks_of[i][0]))]
        block_hw, block_c, num_warps = blocks_of[members[0]]
        groups.append(PoolGroup(
            taps=tuple(members), channels_last=channels_last, aligned=aligned,
            block_hw=block_hw, block_c=block_c, num_warps=num_warps, n_work=len(work),
            tap_table=torch.tensor(rows, dtype=torch.int32).to(device),
            work=torch.tensor(work, dtype=torch.int32).reshape(-1, 2).to(device)))
    return PoolPlan(
        sizes=tuple((shape[2], shape[3]) for shape, _, _ in signature),
        maps_len=maps_len, parts_len=parts_len, gaps_len=gaps_len,
        copy=tuple(i for i, (copied, _, _) in enumerate(layouts) if copied),
        dz_formats=tuple(dz_formats),
        groups=tuple(groups),
        reduce=None if one_block else torch.tensor(reduce_rows, dtype=torch.int32).to(device))


def pool_plan(taps: Sequence[Tensor], block_hw: int | None = None,
              block_c: int | None = None, small_maps_apart: bool = False) -> PoolPlan:
    """The plan of these taps' shapes, strides and dtypes, built once and kept on the device.
    block_hw / block_c: one tile for every launch instead of pool_blocks' choice;
    small_maps_apart: the taps of <= SMALL_HW positions in launches of their own, with their
    own tile (one more launch per side and direction). Both are for measuring alternatives
    (TILE_VARIANTS); the ops use the defaults."""
    return _plan(tap_signature(taps), taps[0].device, block_hw, block_c, small_maps_apart)


# The tiles measured and compiled against pool_blocks' choice before one may replace it
# (`python -m kernels.bench --tiles`, `python -m kernels.compile_check --tile-variants`):
# pool_plan's options for one squarer tile for every tap (more lanes hold data, twice the GAP
# partials) and for the small taps launched apart with their own tile (one more launch per
# side and direction). docs/benchmarks/kernel_plan.md has the model of each.
TILE_VARIANTS: dict[str, dict] = {
    "default": {},
    "64x64 for all": {"block_hw": 64, "block_c": 64},
    "small taps apart": {"small_maps_apart": True},
}


def _dense(taps: Sequence[Tensor], plan: PoolPlan) -> list[Tensor]:
    taps = list(taps)
    for i in plan.copy:
        taps[i] = dense_sample_layout(taps[i])[0]
    return taps


def pool_fwd(taps: Sequence[Tensor], block_hw: int | None = None, block_c: int | None = None,
             plan: PoolPlan | None = None, poison: bool | None = None
             ) -> tuple[Tensor, Tensor]:
    """Triton forward of pool_taps. taps: [B, C_t, H_t, W_t] fp32/fp16/bf16, NCHW or
    channels_last, on CUDA (or CPU under TRITON_INTERPRET=1). Returns (maps [B, sum H*W],
    gaps [B, sum C]), fp32, contiguous, in tap order. block_hw / block_c override the
    heuristic (tuning, tests); `plan`, the taps' pool_plan when the caller has it; `poison`,
    poison_enabled() when a caller of several host functions has read it."""
    plan = plan or pool_plan(taps, block_hw, block_c)
    taps = _dense(taps, plan)
    batch, device = taps[0].shape[0], taps[0].device
    poison = poison_enabled() if poison is None else poison
    maps = new_buffer((batch, plan.maps_len), torch.float32, device, poison)
    parts = new_buffer((batch, plan.parts_len), torch.float32, device, poison)
    if batch == 0:
        return maps, parts[:, :plan.gaps_len]
    for group in plan.groups:
        _pool_fwd_kernel[(batch, group.n_work)](
            group.pick(taps), group.tap_table, group.work, maps, parts,
            plan.maps_len, plan.parts_len, N_TAPS=len(group.taps),
            CHANNELS_LAST=group.channels_last, ALIGNED=group.aligned,
            BLOCK_HW=group.block_hw, BLOCK_C=group.block_c, num_warps=group.num_warps,
        )
    if plan.reduce is None:
        return maps, parts
    gaps = new_buffer((batch, plan.gaps_len), torch.float32, device, poison)
    _gap_reduce_kernel[(batch, plan.reduce.shape[0])](
        parts, gaps, plan.reduce, plan.parts_len, plan.gaps_len, BLOCK=REDUCE_BLOCK,
        num_warps=4)
    return maps, gaps


def _like(z: Tensor, fmt: torch.memory_format | None) -> Tensor:
    """An uninitialized dz for z: dense (batch stride C*H*W), laid out as
    dz_memory_format(z) says (`fmt`)."""
    if fmt is None:  # z is dense itself: empty_like keeps its strides (the cheap case)
        return torch.empty_like(z)
    return torch.empty(tuple(z.shape), dtype=z.dtype, device=z.device, memory_format=fmt)


def _rows(t: Tensor) -> Tensor:
    """t [B, width] with contiguous rows (batch stride free); copies if not."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def pool_bwd(taps: Sequence[Tensor], g_maps: Tensor | None, g_gaps: Tensor | None,
             block_hw: int | None = None, block_c: int | None = None,
             plan: PoolPlan | None = None, poison: bool | None = None) -> list[Tensor]:
    """Triton backward of pool_taps: dz per tap, in the tap's dtype and memory format.

    g_maps: [B, sum H*W] or None (then that term is skipped); g_gaps: [B, sum C] or None.
    Both may have any batch stride (e.g. slices of a larger gradient). `plan`, `poison` as
    pool_fwd's."""
    plan = plan or pool_plan(taps, block_hw, block_c)
    # A tap the kernels cannot index is copied again here, not kept from the forward: kept,
    # the copy would hold an activation's worth of memory from the forward to the backward.
    dzs = [_like(z, fmt) for z, fmt in zip(taps, plan.dz_formats, strict=True)]
    taps = _dense(taps, plan)
    poison = poison_enabled() if poison is None else poison
    if poison:
        for dz in dzs:
            dz.fill_(float("nan"))
    batch = taps[0].shape[0]
    if batch == 0:
        return dzs
    gm = _rows(g_maps) if g_maps is not None else taps[0]
    gg = _rows(g_gaps) if g_gaps is not None else taps[0]
    for group in plan.groups:
        _pool_bwd_kernel[(batch, group.n_work)](
            group.pick(taps), group.pick(dzs),
            group.tap_table, group.work, gm, gg, gm.stride(0), gg.stride(0),
            N_TAPS=len(group.taps), CHANNELS_LAST=group.channels_last, ALIGNED=group.aligned,
            HAS_GMAP=g_maps is not None, HAS_GGAP=g_gaps is not None,
            BLOCK_HW=group.block_hw, BLOCK_C=group.block_c, num_warps=group.num_warps,
        )
    return dzs


# ------------------------------------------------------------- the op: dispatch, autograd


@torch.library.custom_op("fastibd::pool_taps", mutates_args=(),
                         schema="(Tensor[] taps) -> (Tensor, Tensor)")
def pool_taps_op(taps: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(maps [B, sum H*W], gaps [B, sum C]) of the taps; see kernels.reference.pool_taps."""
    if use_triton(taps):
        return pool_fwd(taps)
    return reference.pool_taps(taps)


@pool_taps_op.register_fake
def _pool_taps_fake(taps: list[Tensor]) -> tuple[Tensor, Tensor]:
    dtype = reference.accumulation_dtype(*taps)
    batch = taps[0].shape[0]
    maps_len = sum(z.shape[2] * z.shape[3] for z in taps)
    gaps_len = sum(z.shape[1] for z in taps)
    return (taps[0].new_empty((batch, maps_len), dtype=dtype),
            taps[0].new_empty((batch, gaps_len), dtype=dtype))


def pool_backward_torch(taps: Sequence[Tensor], g_maps: Tensor | None, g_gaps: Tensor | None
                        ) -> list[Tensor]:
    """The reference's autograd formula, written out (a custom op must not call autograd):
    dz per tap in the tap's dtype and memory format, like the Triton path."""
    dzs, map_off, gap_off = [], 0, 0
    for z in taps:
        dtype = reference.accumulation_dtype(z)
        batch, channels, h, w = z.shape
        grad = torch.zeros((), dtype=dtype, device=z.device)
        if g_maps is not None:
            g_map = g_maps[:, map_off:map_off + h * w].reshape(batch, 1, h, w)
            grad = z.to(dtype) * (2.0 / channels) * g_map.to(dtype)
        if g_gaps is not None:
            g_gap = g_gaps[:, gap_off:gap_off + channels]
            grad = grad + (g_gap.to(dtype) / (h * w))[:, :, None, None]
        dz = _like(z, dz_memory_format(z))  # the Triton path's layout
        dz.copy_(grad.expand(z.shape))
        dzs.append(dz)
        map_off, gap_off = map_off + h * w, gap_off + channels
    return dzs


@torch.library.custom_op(
    "fastibd::pool_taps_backward",
    mutates_args=(),
    schema="(Tensor[] taps, Tensor? g_maps, Tensor? g_gaps) -> Tensor[]",
)
def pool_taps_backward_op(taps: list[Tensor], g_maps: Tensor | None, g_gaps: Tensor | None
                          ) -> list[Tensor]:
    """dz_t = 2 z_t / C_t * g_map_t + g_gap_t / (H_t W_t) per tap, in its dtype and memory
    format (a None gradient counts as 0)."""
    if use_triton(taps):
        return pool_bwd(taps, g_maps, g_gaps)
    return pool_backward_torch(taps, g_maps, g_gaps)


@pool_taps_backward_op.register_fake
def _pool_taps_backward_fake(taps: list[Tensor], g_maps: Tensor | None,
                             g_gaps: Tensor | None) -> list[Tensor]:
    return [_like(z, dz_memory_format(z)) for z in taps]


def _pool_setup_context(ctx, inputs, output) -> None:
    (taps,) = inputs
    ctx.save_for_backward(*taps)
    # An output that does not reach the loss (e.g. gaps when the caller ignores them) then
    # arrives as None and the kernel skips that term instead of reading a zero tensor.
    ctx.set_materialize_grads(False)


def _tap_grads(backward, taps: Sequence[Tensor], needed: Sequence[bool],
               g_maps: Tensor | None, g_gaps: Tensor | None) -> list[Tensor | None]:
    """The autograd formula of pool_taps, for both wirings: dz where a tap needs one."""
    if not any(needed) or (g_maps is None and g_gaps is None):
        return [None] * len(taps)
    dzs = backward(list(taps), g_maps, g_gaps)
    return [dz if need else None for dz, need in zip(dzs, needed, strict=True)]


def _pool_backward(ctx, g_maps: Tensor | None, g_gaps: Tensor | None):
    (needed,) = ctx.needs_input_grad  # one bool per tap
    return (_tap_grads(pool_taps_backward_op, ctx.saved_tensors, needed, g_maps, g_gaps),)


pool_taps_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


class _EagerPoolTaps(torch.autograd.Function):
    """pool_taps_op's Triton path with the same autograd formula, minus torch.library's
    Python dispatch (~50 us of host time per call, more than all the kernels' host work):
    what an eager call runs. torch.compile traces pool_taps_op instead."""

    @staticmethod
    def forward(ctx, *taps: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(*taps)
        ctx.set_materialize_grads(False)
        ctx.plan = pool_plan(taps)  # the backward's, too: looked up once
        return pool_fwd(taps, plan=ctx.plan)

    @staticmethod
    def backward(ctx, g_maps: Tensor | None, g_gaps: Tensor | None):
        refuse_double_backward("pool_taps")
        def backward(taps, g_maps, g_gaps):
            return pool_bwd(taps, g_maps, g_gaps, plan=ctx.plan)

        return tuple(_tap_grads(backward, ctx.saved_tensors, ctx.needs_input_grad, g_maps,
                                g_gaps))


# ----------------------------------------------------------------------- the public ops


def pool_taps(taps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Channel-pooled energy maps and GAPs of every tap of a model, one pass over each tap.

    taps: [B, C_t, H_t, W_t] (one batch size), NCHW or channels_last, fp32/fp16/bf16
    (float64 runs the reference). Returns (maps [B, sum H_t W_t], gaps [B, sum C_t]), fp32,
    packed in tap order, differentiable; see kernels.reference.pool_taps."""
    reference.check_taps(taps)
    if eager_triton(taps):
        if torch.is_grad_enabled() and any(z.requires_grad for z in taps):
            return _EagerPoolTaps.apply(*taps)
        return pool_fwd(taps)  # e.g. a frozen teacher's taps: nothing to record
    return pool_taps_op(list(taps))


def pool(z: Tensor) -> tuple[Tensor, Tensor]:
    """pool_taps of one tap, unpacked: (map [B, H, W] = mean_c z^2, gap [B, C] = mean_hw z)."""
    maps, gaps = pool_taps([z])
    return maps.view(z.shape[0], z.shape[2], z.shape[3]), gaps

"""Triton kernels of the `pool` op: channel-pooled energy map and GAP in one pass over z.

    forward   z [B, C, H, W]  ->  map [B, H, W] = mean_c z^2,  gap [B, C] = mean_hw z
    backward  dz = 2 z / C * g_map[:, None] + g_gap[:, :, None, None] / (H W)

Both read z exactly once (the backward also writes dz once); the only other traffic is the
fp32 map / gap (1/C and 1/HW of z) and a small per-block GAP partial (see below).

Blocking. One program owns one sample b and one block of BLOCK_HW spatial positions and
loops over the channels in blocks of BLOCK_C, loading [BLOCK_HW, BLOCK_C] tiles. Its map
entries are therefore complete when the loop ends (no cross-program reduction for the map);
the GAP needs a sum over all spatial blocks, so each program writes its block's partial
channel sums to gap_part [B, n_hw_blocks, C] and the host adds them (a view, no work, when
one block covers H*W). This keeps the result deterministic (no atomics).

Memory formats. Within a sample, z must be NCHW-dense (offset c*HW + hw) or channels_last-
dense (offset hw*C + c); the batch stride is free (a batch slice is read in place). The
CHANNELS_LAST constexpr picks the offset formula, so the unit-stride axis is known at compile
time and loads along it coalesce (C for channels_last, H*W for NCHW). Any other layout is
copied once to the nearest dense format. dz is written in z's format.

All arithmetic is fp32 after the load (bf16/fp16 inputs), as the reference does.

The op is two torch.library custom ops, `fastibd::pool` and `fastibd::pool_backward` (its
autograd formula), with fake functions, so torch.compile(fullgraph=True) traces through
them. Each dispatches inside (kernels.common.use_triton): these kernels for fp32/fp16/bf16
tensors on CUDA (or on the CPU under TRITON_INTERPRET=1), the eager reference otherwise.
Autocast passes inputs through unchanged; outputs are fp32 (float64 stays float64).
"""

import torch
from torch import Tensor

from kernels import reference
from kernels.common import new_buffer, next_pow2, tl, triton, use_triton

# --------------------------------------------------------------------------------- kernels


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
    z_ptr,  # [B, C, H, W], per-sample dense (NCHW or channels_last)
    map_ptr,  # [B, H*W] fp32, contiguous
    part_ptr,  # [B, n_hw_blocks, C] fp32: per-block GAP partials, already divided by H*W
    C,
    HW,
    stride_zb,
    n_hw_blocks,
    inv_hw,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_hw = tl.program_id(1)
    hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    # int64 batch offset: B*C*H*W exceeds 2**31 for large ImageNet batches.
    z_row = z_ptr + pid_b.to(tl.int64) * stride_zb
    part_row = part_ptr + (pid_b.to(tl.int64) * n_hw_blocks + pid_hw) * C
    energy = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c, c_mask, offs, mask = _tile(hw, hw_mask, c0, C, HW, CHANNELS_LAST, BLOCK_C)
        x = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        energy += tl.sum(x * x, axis=1)
        tl.store(part_row + c, tl.sum(x, axis=0) * inv_hw, mask=c_mask)
    tl.store(map_ptr + pid_b.to(tl.int64) * HW + hw, energy / C, mask=hw_mask)


@triton.jit
def _pool_bwd_kernel(
    z_ptr,  # [B, C, H, W] as in the forward
    gmap_ptr,  # [B, H*W] (rows contiguous, batch stride stride_gmb), any float dtype
    ggap_ptr,  # [B, C] (rows contiguous, batch stride stride_ggb), any float dtype
    dz_ptr,  # like z (same within-sample layout, batch stride stride_dzb)
    C,
    HW,
    stride_zb,
    stride_dzb,
    stride_gmb,
    stride_ggb,
    map_scale,  # 2 / C
    inv_hw,
    CHANNELS_LAST: tl.constexpr,
    HAS_GMAP: tl.constexpr,
    HAS_GGAP: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_hw = tl.program_id(1)
    hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    z_row = z_ptr + pid_b * stride_zb
    dz_row = dz_ptr + pid_b * stride_dzb
    if HAS_GMAP:  # loaded once, reused for every channel block
        gm = tl.load(gmap_ptr + pid_b * stride_gmb + hw, mask=hw_mask, other=0.0)
        gm = gm.to(tl.float32) * map_scale
    for c0 in range(0, C, BLOCK_C):
        c, c_mask, offs, mask = _tile(hw, hw_mask, c0, C, HW, CHANNELS_LAST, BLOCK_C)
        grad = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
        if HAS_GMAP:
            x = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            grad += x * gm[:, None]
        if HAS_GGAP:
            gg = tl.load(ggap_ptr + pid_b * stride_ggb + c, mask=c_mask, other=0.0)
            grad += gg.to(tl.float32)[None, :] * inv_hw
        tl.store(dz_row + offs, grad.to(dz_ptr.dtype.element_ty), mask=mask)


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


def dense_sample_layout(z: Tensor) -> tuple[Tensor, bool]:
    """(z, channels_last) with z per-sample dense; copies only a layout the kernels cannot
    index (e.g. a channel slice), to the memory format torch suggests for it."""
    layout = sample_layout(z)
    if layout is None:
        z = z.contiguous(memory_format=torch.channels_last if z.stride(1) == 1 else
                         torch.contiguous_format)
        layout = sample_layout(z)
        assert layout is not None
    return z, layout


def pool_blocks(channels: int, hw: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_HW, BLOCK_C, num_warps) for a [B, C, H, W] map.

    The tile's unit-stride axis gets at least 32 elements (>= 64 contiguous bytes in bf16,
    two full 32-byte sectors), the tile holds <= 4096 elements (16 fp32 registers per
    thread at 8 warps), and in channels_last BLOCK_HW is large (128) so the GAP partials
    stay ~3% of the bytes of z. Untuned: see docs/benchmarks/README.md."""
    if channels_last:
        block_c = min(next_pow2(channels), 32)
        block_hw = min(next_pow2(hw), 4096 // block_c)
    else:
        block_hw = min(next_pow2(hw), 256)
        block_c = min(next_pow2(channels), max(1, 4096 // block_hw))
    num_warps = 8 if block_hw * block_c >= 4096 else 4
    return block_hw, block_c, num_warps


def pool_fwd(z: Tensor, block_hw: int | None = None, block_c: int | None = None
             ) -> tuple[Tensor, Tensor]:
    """Triton forward of pool. z: [B, C, H, W] fp32/fp16/bf16, NCHW or channels_last, on CUDA
    (or CPU under TRITON_INTERPRET=1). Returns (map [B, H, W], gap [B, C]), both fp32 and
    contiguous. block_hw / block_c override the heuristic (tuning, tests)."""
    batch, channels, h, w = z.shape
    hw = h * w
    z, channels_last = dense_sample_layout(z)
    auto_hw, auto_c, num_warps = pool_blocks(channels, hw, channels_last)
    block_hw, block_c = block_hw or auto_hw, block_c or auto_c
    n_blocks = triton.cdiv(hw, block_hw)
    channel_map = new_buffer((batch, h, w), torch.float32, z.device)
    parts = new_buffer((batch, n_blocks, channels), torch.float32, z.device)
    if batch * channels * hw > 0:
        _pool_fwd_kernel[(batch, n_blocks)](
            z, channel_map, parts, channels, hw, z.stride(0), n_blocks, 1.0 / hw,
            CHANNELS_LAST=channels_last, BLOCK_HW=block_hw, BLOCK_C=block_c,
            num_warps=num_warps,
        )
    # One block: the partials already are the GAP (a free view). Else one small reduction.
    gap = parts[:, 0] if n_blocks == 1 else parts.sum(dim=1)
    return channel_map, gap


def _rows(t: Tensor, batch: int, width: int) -> Tensor:
    """t viewed as [batch, width] with contiguous rows (batch stride free); copies if not."""
    t2 = t.reshape(batch, width)
    if width > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def pool_bwd(z: Tensor, g_map: Tensor | None, g_gap: Tensor | None,
             block_hw: int | None = None, block_c: int | None = None) -> Tensor:
    """Triton backward of pool: dz [B, C, H, W] in z's dtype and memory format.

    g_map: [B, H, W] or None (then that term is skipped); g_gap: [B, C] or None. Both may be
    views with any batch stride (e.g. slices of a packed gradient)."""
    batch, channels, h, w = z.shape
    hw = h * w
    z, channels_last = dense_sample_layout(z)
    auto_hw, auto_c, num_warps = pool_blocks(channels, hw, channels_last)
    block_hw, block_c = block_hw or auto_hw, block_c or auto_c
    # dz in the layout the kernel indexes (z may have a free batch stride; dz is dense).
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dz = new_buffer(tuple(z.shape), z.dtype, z.device, memory_format=fmt)
    if batch * channels * hw == 0:
        return dz
    gm = _rows(g_map, batch, hw) if g_map is not None else z
    gg = _rows(g_gap, batch, channels) if g_gap is not None else z
    _pool_bwd_kernel[(batch, triton.cdiv(hw, block_hw))](
        z, gm, gg, dz, channels, hw, z.stride(0), dz.stride(0), gm.stride(0), gg.stride(0),
        2.0 / channels, 1.0 / hw,
        CHANNELS_LAST=channels_last, HAS_GMAP=g_map is not None, HAS_GGAP=g_gap is not None,
        BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dz


# ------------------------------------------------------------- the op: dispatch, autograd


@torch.library.custom_op("fastibd::pool", mutates_args=(), schema="(Tensor z) -> (Tensor, Tensor)")
def pool_op(z: Tensor) -> tuple[Tensor, Tensor]:
    """(map [B, H, W], gap [B, C]) of z [B, C, H, W]; see kernels.reference.pool."""
    if use_triton([z]):
        return pool_fwd(z)
    return reference.pool(z)


@pool_op.register_fake
def _pool_fake(z: Tensor) -> tuple[Tensor, Tensor]:
    dtype = reference.accumulation_dtype(z)
    batch, channels, h, w = z.shape
    return z.new_empty((batch, h, w), dtype=dtype), z.new_empty((batch, channels), dtype=dtype)


@torch.library.custom_op(
    "fastibd::pool_backward",
    mutates_args=(),
    schema="(Tensor z, Tensor? g_map, Tensor? g_gap) -> Tensor",
)
def pool_backward_op(z: Tensor, g_map: Tensor | None, g_gap: Tensor | None) -> Tensor:
    """dz = 2 z / C * g_map + g_gap / (H W), in z's dtype and memory format (None = 0)."""
    if use_triton([z]):
        return pool_bwd(z, g_map, g_gap)
    # The reference's autograd formula, written out (the op must not call autograd itself).
    dtype = reference.accumulation_dtype(z)
    _, channels, h, w = z.shape
    grad = torch.zeros((), dtype=dtype, device=z.device)
    if g_map is not None:
        grad = z.to(dtype) * (2.0 / channels) * g_map.to(dtype).unsqueeze(1)
    if g_gap is not None:
        grad = grad + (g_gap.to(dtype) / (h * w))[:, :, None, None]
    dz = torch.empty_like(z)  # same memory format as z, like the Triton path
    dz.copy_(grad.expand(z.shape))
    return dz


@pool_backward_op.register_fake
def _pool_backward_fake(z: Tensor, g_map: Tensor | None, g_gap: Tensor | None) -> Tensor:
    return torch.empty_like(z)


def _pool_setup_context(ctx, inputs, output) -> None:
    (z,) = inputs
    ctx.save_for_backward(z)
    # An output that does not reach the loss (e.g. gap when the caller ignores it) then
    # arrives as None and the kernel skips that term instead of reading a zero tensor.
    ctx.set_materialize_grads(False)


def _pool_backward(ctx, g_map: Tensor | None, g_gap: Tensor | None):
    (z,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (g_map is None and g_gap is None):
        return None
    return pool_backward_op(z, g_map, g_gap)


pool_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


# ------------------------------------------------------------------------ the public op


def pool(z: Tensor) -> tuple[Tensor, Tensor]:
    """Channel-pooled energy map and GAP of a feature map, in one pass over z.

    z: [B, C, H, W], NCHW or channels_last, fp32/fp16/bf16 (float64 runs the reference).
    Returns (map [B, H, W] = mean_c z^2, gap [B, C] = mean_hw z), fp32, differentiable."""
    if z.dim() != 4:
        raise ValueError(f"pool expects a [B, C, H, W] feature map, got shape {tuple(z.shape)}")
    channel_map, gap = pool_op(z)
    return channel_map, gap

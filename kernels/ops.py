"""torch.library registration of the fused ops: dispatch, fake (meta) functions, autograd.

Four custom ops in the `fastibd` namespace, all with `mutates_args=()`:

    fastibd::pool(Tensor z) -> (Tensor map, Tensor gap)
    fastibd::pool_backward(Tensor z, Tensor? g_map, Tensor? g_gap) -> Tensor dz
    fastibd::pair_distances(Tensor[] t_maps, Tensor[] s_maps) -> (Tensor d, Tensor stats)
    fastibd::pair_distances_backward(Tensor grad_d, Tensor[] t_maps, Tensor[] s_maps,
                                     Tensor stats, bool need_t, bool need_s)
        -> (Tensor gt_packed, Tensor gs_packed)

Dispatch happens *inside* each op (one implementation for every device): Triton when the
tensors are on CUDA (or on CPU under TRITON_INTERPRET=1, which is how the CPU test suite runs
the real kernels) and their dtype is fp32/fp16/bf16; the eager reference otherwise (CPU,
float64). `triton_op` would let Inductor see into the kernels, but it does not trace on CPU.

Because each op has a fake function and its backward is itself a custom op, torch.compile
(fullgraph=True) traces a loss built on them without graph breaks, forward and backward.
The backward ops return packed gradients ([B, sum H*W] per side): custom-op outputs may not
alias each other, so the per-map views are cut in the (traceable) autograd formula instead.

`stats` is an implementation detail of the Triton path (the three sums per pair, saved for
the backward; an empty tensor on the reference path). Use kernels.fused.pair_distances, which
returns d only, with the reference signature.

Autocast: the ops are not in any autocast list, so autocast passes inputs through unchanged
(bf16 feature maps stay bf16); every op computes in fp32 internally and returns fp32 outputs
(float64 stays float64), exactly as kernels.reference does with or without autocast.
Double backward is not supported (the backward ops have no autograd formula).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from kernels import reference
from kernels.common import interpreting

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (CUDA wheels of torch bring it; some platforms have none)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensors: Sequence[Tensor]) -> bool:
    """The dispatch rule of every op: Triton for fp32/fp16/bf16 tensors on CUDA, or on the
    CPU under TRITON_INTERPRET=1 (tests); the eager reference for anything else."""
    if not tensors or any(t.dtype not in TRITON_DTYPES for t in tensors):
        return False
    device = tensors[0].device.type
    if device != "cuda" and not (device == "cpu" and interpreting()):
        return False
    return triton_available()


def _packed_len(maps: Sequence[Tensor]) -> int:
    return sum(x.shape[-2] * x.shape[-1] for x in maps)


# -------------------------------------------------------------------------------- pool


@torch.library.custom_op("fastibd::pool", mutates_args=(), schema="(Tensor z) -> (Tensor, Tensor)")
def pool_op(z: Tensor) -> tuple[Tensor, Tensor]:
    """(map [B, H, W], gap [B, C]) of z [B, C, H, W]; see kernels.reference.pool."""
    if use_triton([z]):
        from kernels import pool as pool_kernels

        return pool_kernels.pool_fwd(z)
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
        from kernels import pool as pool_kernels

        return pool_kernels.pool_bwd(z, g_map, g_gap)
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


# ---------------------------------------------------------------------- pair_distances


@torch.library.custom_op(
    "fastibd::pair_distances",
    mutates_args=(),
    schema="(Tensor[] t_maps, Tensor[] s_maps) -> (Tensor, Tensor)",
)
def pair_distances_op(t_maps: list[Tensor], s_maps: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(d [B, n, m], stats); d as kernels.reference.pair_distances. stats is [3, B, n, m] on
    the Triton path (saved for its backward) and an empty tensor on the reference path."""
    if use_triton([*t_maps, *s_maps]):
        from kernels import pairs as pair_kernels

        return pair_kernels.pairs_fwd(t_maps, s_maps)
    d = reference.pair_distances(t_maps, s_maps)
    return d, d.new_empty((0,))


@pair_distances_op.register_fake
def _pair_distances_fake(t_maps: list[Tensor], s_maps: list[Tensor]) -> tuple[Tensor, Tensor]:
    dtype = reference.accumulation_dtype(*t_maps, *s_maps)
    batch, n, m = t_maps[0].shape[0], len(t_maps), len(s_maps)
    d = t_maps[0].new_empty((batch, n, m), dtype=dtype)
    if use_triton([*t_maps, *s_maps]):
        return d, t_maps[0].new_empty((3, batch, n, m), dtype=torch.float32)
    return d, t_maps[0].new_empty((0,), dtype=dtype)


def pairs_backward_torch(
    grad_d: Tensor, t_maps: Sequence[Tensor], s_maps: Sequence[Tensor], need_t: bool,
    need_s: bool,
) -> tuple[Tensor, Tensor]:
    """The backward of kernels.reference.pair_distances in plain torch (the reference path of
    fastibd::pair_distances_backward; a custom op runs below autograd, so it cannot call
    autograd on the reference). Same formula as the Triton kernels (kernels/pairs.py), per
    teacher size group, with the adjoint of adaptive pooling done by ATen's own backward op.
    Returns packed gradients like pairs_bwd, in the accumulation dtype."""
    dtype = reference.accumulation_dtype(*t_maps, *s_maps)
    eps = reference.NORMALIZE_EPS
    batch = t_maps[0].shape[0]
    t_list = [x.to(dtype) for x in t_maps]
    s_list = [x.to(dtype) for x in s_maps]
    g_t = [torch.zeros_like(x) for x in t_list]
    g_s = [torch.zeros_like(x) for x in s_list]
    grad_d = grad_d.to(dtype)
    sizes = list(dict.fromkeys((x.shape[-2], x.shape[-1]) for x in t_list))
    for size in sizes:
        idx = [i for i, x in enumerate(t_list) if (x.shape[-2], x.shape[-1]) == size]
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
    schema="(Tensor grad_d, Tensor[] t_maps, Tensor[] s_maps, Tensor stats, bool need_t, "
    "bool need_s) -> (Tensor, Tensor)",
)
def pair_distances_backward_op(
    grad_d: Tensor,
    t_maps: list[Tensor],
    s_maps: list[Tensor],
    stats: Tensor,
    need_t: bool,
    need_s: bool,
) -> tuple[Tensor, Tensor]:
    """Packed gradients (gt [B, sum Ht*Wt], gs [B, sum Hs*Ws]) in the accumulation dtype;
    a side not asked for is an empty [0] tensor."""
    if use_triton([*t_maps, *s_maps]):
        from kernels import pairs as pair_kernels

        return pair_kernels.pairs_bwd(grad_d, t_maps, s_maps, stats, need_t, need_s)
    return pairs_backward_torch(grad_d, t_maps, s_maps, need_t, need_s)


@pair_distances_backward_op.register_fake
def _pair_distances_backward_fake(
    grad_d: Tensor,
    t_maps: list[Tensor],
    s_maps: list[Tensor],
    stats: Tensor,
    need_t: bool,
    need_s: bool,
) -> tuple[Tensor, Tensor]:
    dtype = reference.accumulation_dtype(*t_maps, *s_maps)
    if use_triton([*t_maps, *s_maps]):
        dtype = torch.float32
    batch = t_maps[0].shape[0]
    empty = grad_d.new_empty((0,), dtype=dtype)
    gt = grad_d.new_empty((batch, _packed_len(t_maps)), dtype=dtype) if need_t else empty
    gs = grad_d.new_empty((batch, _packed_len(s_maps)), dtype=dtype) if need_s else empty
    return gt, gs


def _unpack(packed: Tensor, like: Sequence[Tensor], needed: Sequence[bool]) -> list:
    """Per-map gradient views [B, H, W] of a packed [B, L] gradient (None where not needed)."""
    out, offset = [], 0
    for x, need in zip(like, needed, strict=True):
        size = x.shape[-2] * x.shape[-1]
        out.append(packed[:, offset:offset + size].view(x.shape).to(x.dtype) if need else None)
        offset += size
    return out


def _pairs_setup_context(ctx, inputs, output) -> None:
    t_maps, s_maps = inputs
    _, stats = output
    ctx.n = len(t_maps)
    ctx.save_for_backward(*t_maps, *s_maps, stats)
    ctx.set_materialize_grads(False)


def _pairs_backward(ctx, grad_d: Tensor | None, _grad_stats: Tensor | None):
    saved = ctx.saved_tensors
    t_maps, s_maps, stats = saved[: ctx.n], saved[ctx.n : -1], saved[-1]
    t_needed, s_needed = ctx.needs_input_grad  # one list of bools per list input
    need_t, need_s = any(t_needed), any(s_needed)
    if grad_d is None or not (need_t or need_s):
        return [None] * len(t_maps), [None] * len(s_maps)
    gt, gs = pair_distances_backward_op(grad_d, list(t_maps), list(s_maps), stats, need_t,
                                        need_s)
    t_grads = _unpack(gt, t_maps, t_needed) if need_t else [None] * len(t_maps)
    s_grads = _unpack(gs, s_maps, s_needed) if need_s else [None] * len(s_maps)
    return t_grads, s_grads


pair_distances_op.register_autograd(_pairs_backward, setup_context=_pairs_setup_context)

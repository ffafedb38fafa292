"""What the fused ops share: Triton (or a stand-in where it is not installed, so every op
module imports and falls back to the reference), the dispatch rule, buffers.

Output poisoning: with FASTIBD_POISON_OUTPUTS=1 every buffer a host function allocates for a
kernel to fill (outputs and intermediates) starts as NaN instead of uninitialized memory, so
an element a kernel forgot to write shows up as NaN in a comparison instead of passing by
luck. The kernel tests turn it on; it costs one fill per buffer, so it is off by default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor


class _NoTriton:
    """Stands in for `triton` and `triton.language` where Triton is not installed: `@jit`
    leaves a kernel a plain function and any attribute (an annotation such as
    `tl.constexpr`) is this object, so the op modules import and `use_triton` says no."""

    def jit(self, fn):
        return fn

    def __getattr__(self, name: str) -> _NoTriton:
        return self


try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # CUDA wheels of torch bring Triton; some platforms have none
    triton = tl = _NoTriton()
    TRITON_AVAILABLE = False

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

POISON_ENV = "FASTIBD_POISON_OUTPUTS"
INTERPRET_ENV = "TRITON_INTERPRET"


def poison_enabled() -> bool:
    """True when FASTIBD_POISON_OUTPUTS=1 (read at every call, so tests can flip it)."""
    return os.environ.get(POISON_ENV, "") == "1"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get(INTERPRET_ENV, "") == "1"


def new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               poison: bool) -> Tensor:
    """An uninitialized buffer for a kernel to fill, or NaN-filled when `poison` (the
    caller's poison_enabled(), read once for all the buffers it allocates)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison:
        out.fill_(float("nan"))
    return out


def refuse_double_backward(op: str) -> None:
    """Called first in the backward of an eager node: its backward is not differentiable, so
    create_graph=True (grad mode on inside a backward) is an error here, not a gradient that
    silently drops its second-order terms (once_differentiable lets that through when the
    incoming gradients are constants)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op} has no double backward: the fused kernels' gradients cannot "
                           "be differentiated again (create_graph=True); use "
                           "kernels.reference for a gradient penalty")


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (>= 1): Triton block shapes must be powers of two."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def eager_triton(tensors: Sequence[Tensor]) -> bool:
    """use_triton, outside torch.compile's tracing: the ops then skip torch.library's Python
    dispatch (an autograd.Function runs the same host functions); traced code keeps the
    registered custom ops, which torch.compile needs."""
    # is_compiling first: dynamo then traces nothing of the dispatch rule
    return not torch.compiler.is_compiling() and use_triton(tensors)


def triton_available() -> bool:
    """Whether Triton is installed here."""
    return TRITON_AVAILABLE


def use_triton(tensors: Sequence[Tensor]) -> bool:
    """The dispatch rule of every op: Triton for fp32/fp16/bf16 tensors on CUDA, or on the
    CPU under TRITON_INTERPRET=1 (tests); the eager reference for anything else."""
    if not tensors or any(t.dtype not in TRITON_DTYPES for t in tensors):
        return False
    return triton_device(tensors[0].device)


def triton_device(device: torch.device) -> bool:
    """use_triton's rule for the device alone (a caller that checks the dtypes itself)."""
    kind = device.type
    if kind != "cuda" and not (kind == "cpu" and interpreting()):
        return False
    return triton_available()

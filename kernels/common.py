"""Helpers shared by the Triton host functions (no Triton import here: kernels.fused must
import on machines without Triton, and this module is imported by it).

Output poisoning: with FASTIBD_POISON_OUTPUTS=1 every buffer a host function allocates for a
kernel to fill (outputs and intermediates) starts as NaN instead of uninitialized memory, so
an element a kernel forgot to write shows up as NaN in a comparison instead of passing by
luck. The kernel tests turn it on; it costs one fill per buffer, so it is off by default.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

POISON_ENV = "FASTIBD_POISON_OUTPUTS"
INTERPRET_ENV = "TRITON_INTERPRET"


def poison_enabled() -> bool:
    """True when FASTIBD_POISON_OUTPUTS=1 (read at every call, so tests can flip it)."""
    return os.environ.get(POISON_ENV, "") == "1"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get(INTERPRET_ENV, "") == "1"


def new_buffer(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """An uninitialized buffer for a kernel to fill, or NaN-filled when poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if poison_enabled():
        out.fill_(float("nan"))
    return out


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (>= 1): Triton block shapes must be powers of two."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()

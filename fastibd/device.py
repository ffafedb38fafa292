"""Where and how a run computes: device, precision, layout and compilation, each resolved
from a setting that may say `auto`. Training, evaluation and the benchmarks share these."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastibd.errors import UserError


def resolve_device(name: str, option: str) -> torch.device:
    """`auto` -> cuda when there is one, else cpu. `option` names the setting in the error
    (e.g. `--device`, `training.device`)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}=cuda, but this machine has no CUDA device (use "
                        f"{option}=auto or {option}=cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def training_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on CUDA (what tensor-core convolutions want); NCHW on CPU, where
    channels_last gains little and oneDNN's 1x1 stride-2 weight gradient is wrong in
    channels_last when the layer has fewer input channels than its SIMD block (narrow
    layers, as in tiny models: oneDNN issue #6035; tests/test_train.py checks it)."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def resolve_compile(name: str, device: torch.device) -> bool:
    return device.type == "cuda" if name == "auto" else name == "true"


@dataclass(frozen=True)
class Runtime:
    """Where and how a training step computes (the trainer's and the benchmark's)."""

    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 = no autocast
    memory_format: torch.memory_format
    compiled: bool
    compile_mode: str | None = None

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_runtime(device: str, precision: str, compile: str, compile_mode: str | None,
                    device_option: str = "training.device") -> Runtime:
    """A Runtime from settings that may say `auto`; `device_option` names the device setting
    in errors."""
    resolved = resolve_device(device, device_option)
    return Runtime(resolved, resolve_precision(precision, resolved),
                   training_memory_format(resolved), resolve_compile(compile, resolved),
                   compile_mode)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA is asynchronous) before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """What the run computed on, for records: the GPU's model name (e.g. "NVIDIA H200"), or
    "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type

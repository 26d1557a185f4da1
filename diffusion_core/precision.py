"""Whether bf16 autocast pays on a device: `bf16: auto` in params resolves here.

Autocast to bf16 is fast only where the hardware computes in bf16: CUDA GPUs that support it, x86 CPUs with
AVX512-BF16 or AMX-BF16, ARM CPUs with the BF16 extension. Elsewhere PyTorch emulates it, and that costs more
than it saves, many times over (bench/train_diffusion_speed.py; figures in bench/README.md).
"""

from __future__ import annotations

import functools
import platform
from typing import Literal

import torch

Bf16 = bool | Literal["auto"]
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16, x86 AMX-BF16, aarch64 BF16


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / aarch64
            flags.update(value.split())
    return frozenset(flags)


def bf16_is_fast(device: str | torch.device = "cpu") -> bool:
    """True where bf16 autocast runs on bf16 hardware (see the module docstring), False where it is emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return platform.system() == "Linux" and bool(_CPU_BF16_FLAGS & cpu_flags())
    return False


def resolve_bf16(setting: Bf16, device: str | torch.device = "cpu") -> bool:
    """A params `bf16` value: True / False as given; "auto": `bf16_is_fast(device)`."""
    if setting == "auto":
        return bf16_is_fast(device)
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"bf16 must be true, false or auto, got {setting!r}")

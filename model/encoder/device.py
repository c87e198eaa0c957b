"""Which device and precision to run on: CUDA when present, bf16 where the hardware computes it natively."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

__all__ = ["bf16_supported", "cpu_has_bf16", "lightning_device", "resolve_device"]


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is worth using on ``device``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_bf16()


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → the first CUDA GPU if present, else CPU; other strings are passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lightning_device(device: str) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for a ``DEVICE`` setting: one device per job.

    ``auto`` → ("auto", 1); ``cpu`` → ("cpu", 1); ``cuda`` → ("gpu", 1); ``cuda:N`` → ("gpu", (N,)).
    """
    if device == "cpu":
        return "cpu", 1
    if device == "cuda":
        return "gpu", 1
    if device.startswith("cuda:"):
        return "gpu", (int(device.split(":", 1)[1]),)
    return "auto", 1

"""Device choice: the same code on CPU (here) and CUDA (clusters)."""

from __future__ import annotations

import torch

from core.errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' asked for but CUDA is not available here (set train.device: auto or cpu)")
    return device


def describe(device: torch.device) -> str:
    """A human-readable device name for result rows (wall times only compare on the same device)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'' if n == 1 else 's'})"

"""Device choice: the same code on CPU (here) and CUDA (clusters), and never the wrong one silently."""

from __future__ import annotations

import os

import torch

from core.errors import ConfigError

_NO_GPUS = {"", "-1", "NoDevFiles"}  # CUDA_VISIBLE_DEVICES values meaning "no GPU" (NoDevFiles: SLURM without GPUs)


def resolve_device(spec: str = "auto", *, check_allocation: bool = False) -> torch.device:
    """`spec` as a device; `auto` is CUDA when usable, else CPU.

    With `check_allocation` (training and the CLI's jobs), `auto` refuses the CPU when the job holds GPUs: a
    CPU-only torch build or a driver mismatch would otherwise run a paper-scale job on the CPU without a word.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if check_allocation and (said := gpus_allocated(os.environ)):
            raise ConfigError(f"device is auto and {said} says this job holds GPUs, but torch.cuda is "
                              f"unavailable ({_why_no_cuda()}): install a CUDA build of torch, or use the CPU "
                              "on purpose (train.device: cpu, workflow.eval_device: cpu, --device cpu)")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' asked for but CUDA is not available here ({_why_no_cuda()}): "
                          "install a CUDA build of torch, or use device cpu (train.device: cpu, --device cpu)")
    return device


def gpus_allocated(env) -> str | None:
    """The variable (NAME=value) by which the scheduler says this job holds GPUs, or None."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in _NO_GPUS:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS"):
        value = env.get(name, "").strip()
        if value and value != "0":
            return f"{name}={value}"
    return None


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: a driver mismatch?"


def describe(device: torch.device) -> str:
    """A human-readable device name for result rows (wall times only compare on the same device)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    n = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {n} thread{'' if n == 1 else 's'})"

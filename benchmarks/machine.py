"""The machine a benchmark ran on, and whether others were using it (the 1-minute load average)."""

from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def describe() -> dict[str, str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"CPU": cpu_model(), "cores": str(os.cpu_count()), "torch": torch.__version__,
            "threads (torch.set_num_threads)": str(torch.get_num_threads()), "GPU": gpu,
            "python": platform.python_version()}

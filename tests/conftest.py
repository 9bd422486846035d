"""Shared fixtures: tests run on CPU with small threads so two test processes do not fight for 2 cores."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _cpu_threads():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def pytest_collection_modifyitems(config, items):
    """The SLURM cluster tests run last. They install SLURM's client tools, and once its daemons are stopped the
    SLURM executor plugin's `scontrol show config` (asked at every Snakemake start, whatever the executor) waits
    about 9 s for a controller that is gone: the later tests would pay that at each Snakemake call."""
    items.sort(key=lambda item: item.path.parent.name == "cluster" and item.path.name == "test_slurm.py")

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

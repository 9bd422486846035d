"""common.device: `auto` never falls back to the CPU silently where the job was given GPUs."""

import pytest
import torch

from common import distributed
from common.device import gpus_allocated, resolve_device
from core.errors import ConfigError

GPU_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS")


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine whose torch cannot use CUDA (a CPU-only build, or a driver mismatch), with no GPU variables."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in (*GPU_VARS, "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name, value", [("CUDA_VISIBLE_DEVICES", "0,1"), ("SLURM_GPUS_ON_NODE", "4"),
                                         ("SLURM_JOB_GPUS", "2,3")])
def test_auto_fails_loud_where_the_job_holds_gpus(no_cuda, name, value):
    no_cuda.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        resolve_device("auto", check_allocation=True)
    msg = str(e.value)
    assert f"{name}={value}" in msg and "torch.cuda is unavailable" in msg
    assert "install a CUDA build of torch" in msg and "train.device: cpu" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=name):  # training goes through distributed.setup
        distributed.setup("auto")
    assert resolve_device("cpu", check_allocation=True) == torch.device("cpu")  # cpu always works
    assert distributed.setup("cpu")[1] == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # other commands (sampling, features) keep the fallback


@pytest.mark.parametrize("value", ["", "-1", "NoDevFiles"])
def test_auto_is_the_cpu_without_allocated_gpus(no_cuda, value):
    no_cuda.setenv("CUDA_VISIBLE_DEVICES", value)
    no_cuda.setenv("SLURM_GPUS_ON_NODE", "0")
    assert gpus_allocated({"CUDA_VISIBLE_DEVICES": value, "SLURM_GPUS_ON_NODE": "0"}) is None
    assert resolve_device("auto", check_allocation=True) == torch.device("cpu")


def test_cuda_without_cuda_is_an_error_and_auto_takes_cuda_when_usable(no_cuda):
    with pytest.raises(ConfigError, match="device 'cuda:1' asked for but CUDA is not available"):
        resolve_device("cuda:1")
    no_cuda.setattr(torch.cuda, "is_available", lambda: True)
    no_cuda.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert resolve_device("auto", check_allocation=True) == torch.device("cuda")

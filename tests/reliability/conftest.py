"""Shared pieces of the reliability tests: a tiny gmm config, real `cmbench` subprocesses, bitwise comparison.

Every subprocess runs single-threaded (OMP_NUM_THREADS=1, as the reference does) so that "bitwise identical"
compares like with like.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import checkpoint

ROOT = Path(__file__).resolve().parents[2]

# ct: random init, a target network (theta-) and EMA; dropout draws from the reseeded torch RNG every step.
CONFIG = """
datasets:
  pts:
    data:
      kind: gmm
      n_train: 300
      gmm: {means: [[0.5, 0.0], [-0.5, 0.0]], stds: [0.1, 0.1], weights: [0.5, 0.5]}
    network: {kind: mlp, hidden: 16, depth: 1, dropout: 0.1}
    train: {iterations: 60, batch_size: 64, lr: 2e-3, ema_halflife_kimg: 0.5, log_every: 1,
            checkpoint_every: 7, keep_checkpoints: 2, device: cpu}
    eval: {n_samples: 64, steps: [1]}
"""
METHOD = "ct"
ITERATIONS = 60


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SNAKEMAKE_"))}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return e


def train_cmd(config: Path, out: Path, *, hook: str | None = None, method: str = METHOD) -> list[str]:
    """`python -m common.cli train ...`, or the same CLI behind a kill hook (tests/reliability/killhook.py)."""
    entry = ["-m", "tests.reliability.killhook", hook] if hook else ["-m", "common.cli"]
    return [sys.executable, *entry, "train", "--config", str(config), "--dataset", "pts", "--method", method,
            "--seed", "0", "--out", str(out)]


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def stats_lines(out: Path) -> int:
    path = out / "stats.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll until `predicate()` holds; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(0.005)
    raise TimeoutError("condition not reached")


def final_states(out: Path) -> dict:
    """final.pt and the last step checkpoint (which holds the optimizer state, the target network and counters)."""
    return {"final": checkpoint.load(out / "final.pt"),
            "last": checkpoint.load(checkpoint.step_path(out / "checkpoints", ITERATIONS))}


def assert_bitwise_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, b.view(-1).view(torch.uint8)
                           if b.numel() else b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="session")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="session")
def reference(config_file, tmp_path_factory) -> dict:
    """An uninterrupted run: the states every interrupted-and-resumed run must equal bitwise."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_cli(train_cmd(config_file, out))
    assert proc.returncode == 0, proc.stderr
    return final_states(out)

"""Data-parallel training (common/distributed.py): 2 gloo processes under torchrun on CPU.

sCT's loss takes a JVP with torch.func.jvp, which bypasses a DDP wrapper's gradient hooks; the loop averages
gradients itself.  After one step both ranks hold identical parameters, equal to one process on the whole batch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import distributed
from common.config import load_config, resolve_run
from core.errors import ConfigError
from tests.common.ddp_worker import BATCH, make_model, sct_step

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
datasets:
  gmm:
    data: {kind: gmm, n_train: 256, gmm: {means: [[0.5, 0.0], [-0.5, 0.0]], stds: [0.1, 0.1], weights: [0.5, 0.5]}}
    network: {kind: mlp, hidden: 16, depth: 2, logvar_head: true}
    train: {iterations: 4, batch_size: 16, devices: 2, init: random, log_every: 2, checkpoint_every: 2,
            device: cpu}
methods:
  sct: {}
"""


def test_two_gloo_processes_sync_jvp_gradients_like_one_process(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.common.ddp_worker", str(tmp_path), str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    step = torch.load(tmp_path / "step.pt")
    (g0, g1), (p0, p1) = step["grads"], step["params"]
    assert torch.equal(g0, g1) and torch.equal(p0, p1)  # the ranks agree exactly
    ref_grads, ref_params = sct_step(make_model(), torch.arange(BATCH), distributed.Group())
    torch.testing.assert_close(g0, ref_grads, rtol=1e-5, atol=1e-7)  # = one process on the concatenated batch
    torch.testing.assert_close(p0, ref_params, rtol=1e-5, atol=1e-7)
    half_grads, _ = sct_step(make_model(), torch.arange(BATCH // 2), distributed.Group())
    assert (half_grads - ref_grads).abs().max() > 1e-3  # without the average, rank 0 would have stepped elsewhere

    run_dir = tmp_path / "run"  # the loop under torchrun: rank 0 alone wrote the run folder, once
    assert (run_dir / "final.pt").exists()
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert json.loads((run_dir / "config.json").read_text())["train"]["devices"] == 2


def test_shards_cover_the_global_batch_once():
    idx = torch.randperm(12)
    parts = [distributed.shard(idx, distributed.Group(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), idx)
    assert distributed.rank_seed(123, 0) == 123 and len({distributed.rank_seed(123, r) for r in range(4)}) == 4


def test_devices_is_checked_before_compute(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.replace("batch_size: 16", "batch_size: 15"))
    with pytest.raises(ConfigError, match="batch_size.*multiple of train.devices"):
        load_config(path)
    path.write_text(CONFIG)
    run = resolve_run(load_config(path), "gmm", "sct", 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2"):
        distributed.setup("cpu", run.train.devices)
    path.write_text(CONFIG.replace("devices: 2", "devices: 1"))
    one = resolve_run(load_config(path), "gmm", "sct", 0)
    assert "devices" not in json.loads(one.to_json())["train"]  # configs of runs made before the key stay valid
    assert distributed.launch_prefix("py", 1) == "py -m common.cli"
    assert "--nproc_per_node 4 -m common.cli" in distributed.launch_prefix("py", 4)

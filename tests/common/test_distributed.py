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


# ---------------------------------------------------------------------------------------------------
# Micro-batches (train.batch_per_gpu) and several nodes (train.nodes)

ICT = """
datasets:
  gmm:
    data: {kind: gmm, n_train: 256, gmm: {means: [[0.5, 0.0], [-0.5, 0.0]], stds: [0.1, 0.1], weights: [0.5, 0.5]}}
    network: {kind: mlp, hidden: 16, depth: 2, dropout: 0.2}
    train: {iterations: 4, batch_size: 16, lr: 1.0e-2, log_every: 2, checkpoint_every: 2, device: cpu, TRAIN}
methods:
  ict: {}
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cmd(prefix: list[str], config: Path, out: Path) -> list[str]:
    return [*prefix, "train", "--config", str(config), "--dataset", "gmm", "--method", "ict", "--seed", "0",
            "--out", str(out)]


def _final(out: Path) -> dict:
    from common import checkpoint

    state = checkpoint.load(out / "final.pt")
    return {f"{k}.{n}": t for k in ("model", "ema") for n, t in state[k].items()}


@pytest.mark.slow
def test_micro_batches_processes_and_nodes_train_bitwise_alike(tmp_path):
    """Batch 16 as 1 process x 2 micro-batches of 8 (batch_per_gpu), as 2 gloo processes (devices 2), and as 2
    torchrun "nodes" of 1 process on localhost (nodes 2, c10d rendezvous): the same final weights, bitwise.

    iCT with dropout draws noise in every micro-batch, so this holds only because micro-batch j gets the same
    rows and seed on whichever process runs it, and the two gradients are summed before one division."""
    import shlex

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    runs = {"micro": "batch_per_gpu: 8", "devices": "devices: 2", "nodes": "nodes: 2"}
    configs = {}
    for name, train in runs.items():
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(ICT.replace("TRAIN", train))
    py = [sys.executable]
    single = subprocess.run(_train_cmd([*py, "-m", "common.cli"], configs["micro"], tmp_path / "micro"), cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "2 micro-batches of 8 per process" in single.stdout
    standalone = shlex.split(distributed.launch_prefix(sys.executable, 2))
    two = subprocess.run(_train_cmd(standalone, configs["devices"], tmp_path / "devices"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    node = shlex.split(distributed.torchrun_nodes(sys.executable, 1, 2, f"127.0.0.1:{_free_port()}", "cmbench-test"))
    procs = [subprocess.Popen(_train_cmd(node, configs["nodes"], tmp_path / "nodes"), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)

    ref = _final(tmp_path / "micro")
    for name in ("devices", "nodes"):
        got = _final(tmp_path / name)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), f"{name} differs from 1 process x 2 micro-batches"
    whole = resolve_run(load_config(configs["micro"]), "gmm", "ict", 0)
    assert json.loads(whole.to_json())["train"]["batch_per_gpu"] == 8
    nodes_config = json.loads((tmp_path / "nodes" / "config.json").read_text())["train"]
    assert nodes_config["nodes"] == 2 and "devices" not in nodes_config and "batch_per_gpu" not in nodes_config


def test_micro_batches_are_the_ranks_slices_and_seeds():
    """Global micro-batch j = rank * accum + a: with accum 1 it is `shard`; across ranks they tile the batch."""
    idx = torch.randperm(24)
    for world in (1, 2, 3):
        for r in range(world):
            (j, i), = distributed.micro_batches(idx, distributed.Group(r, world), 1)
            assert j == r and torch.equal(i, distributed.shard(idx, distributed.Group(r, world)))
    js = [(j, i) for r in range(2) for j, i in distributed.micro_batches(idx, distributed.Group(r, 2), 3)]
    assert [j for j, _ in js] == list(range(6)) and torch.equal(torch.cat([i for _, i in js]), idx)
    one = list(distributed.micro_batches(idx, distributed.Group(), 6))
    assert all(j == k and torch.equal(i, js[k][1]) for k, (j, i) in enumerate(one))  # 1 x 6 = 2 x 3


def test_accumulated_micro_batches_match_the_whole_batch_in_float64():
    """The mean of k micro-batch gradients equals the whole batch's gradient to float64 rounding.

    Not bitwise, by design: the backward GEMMs sum over the batch in another order (one sum over B rows against
    k sums over B/k rows added afterwards), and in training each micro-batch also draws its own noise (seed
    `rank_seed(step seed, j)`), so a stochastic loss sees other draws than one whole-batch call.  What is bitwise
    is 1 process x k micro-batches against k processes x 1 (test above)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randn(24, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.SiLU(), torch.nn.Linear(32, 3)).double()

    def grads(accum: int) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        for _, idx in distributed.micro_batches(torch.arange(24), distributed.Group(), accum):
            torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        distributed.average_gradients(list(model.parameters()), distributed.Group(), accum)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    whole = grads(1)
    for k in (2, 3, 4, 8):
        torch.testing.assert_close(grads(k), whole, rtol=1e-13, atol=1e-15)


def test_batch_per_gpu_and_nodes_are_checked(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(ICT.replace("TRAIN", "devices: 2, batch_per_gpu: 3"))
    with pytest.raises(ConfigError, match=r"train.batch_per_gpu: must divide .* = 16 / 2 = 8"):
        load_config(path)
    path.write_text(ICT.replace("TRAIN", "devices: 2, nodes: 3"))
    with pytest.raises(ConfigError, match=r"batch_size: must be a multiple of train.devices x train.nodes"):
        load_config(path)
    path.write_text(ICT.replace("TRAIN", "nodes: 2"))
    run = resolve_run(load_config(path), "gmm", "ict", 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="is 2 x 1 but this job has WORLD_SIZE=1.*--nnodes 2 --nproc_per_node 1") as e:
        distributed.setup("cpu", run.train.devices, run.train.nodes)
    assert "\n" not in str(e.value)


def test_multinode_launcher_runs_one_torchrun_per_node():
    """srun starts one torchrun per node inside the plugin's own one-task step (hence --overlap, and --ntasks
    against the inherited SLURM_NTASKS=1); the rendezvous lies on the allocation's first host."""
    cmd = distributed.launch_prefix("/v/bin/python", 8, nodes=4)
    assert cmd.startswith("srun --overlap --nodes 4 --ntasks 4 --ntasks-per-node 1 --kill-on-bad-exit=1 ")
    assert "/v/bin/python -m torch.distributed.run --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d" in cmd
    assert '--rdzv-id "$SLURM_JOB_ID" -m common.cli' in cmd
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "4711", "CMBENCH_RDZV_PORT": "31000"}
    if subprocess.run(["which", "scontrol"], capture_output=True).returncode == 0:  # scontrol expands host lists
        echoed = subprocess.run(["bash", "-c", f"set -euo pipefail; echo {cmd.split(' -m torch.distributed.run ')[1]}"],
                                env=env, capture_output=True, text=True, check=True).stdout
        assert "--rdzv-endpoint gpu07:31000 --rdzv-id 4711 -m common.cli" in echoed
    assert distributed.launch_prefix("py", 4, nodes=1) == distributed.launch_prefix("py", 4)

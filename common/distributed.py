"""Data-parallel training over several processes (torchrun), one GPU each on CUDA, gloo processes on CPU.

Why not the DistributedDataParallel wrapper: DDP syncs gradients through hooks that fire only when the loss flows
through `DDP.forward`.  Our methods call other entry points of the model (`model.consistency`, the parameterization
wrappers) and sCT/sCD/FACM take `torch.func.jvp` of it, which bypasses DDP's reducer: gradients would silently stay
per-rank.  So the loop averages gradients itself after backward (`average_gradients`, one all-reduce per bucket),
which is DDP's arithmetic without its overlap of communication and backward, and correct for every method.

Conventions (identical across ranks unless said): the global batch is `train.batch_size`, cut into
world_size x accum micro-batches (accum = share / train.batch_per_gpu, 1 by default); rank r runs the global
micro-batches j = r * accum + a, each the j-th contiguous slice of the step's indices, with the RNG seeded by
`rank_seed(step seed, j)`; gradients are summed over micro-batches and ranks, then divided once by their number.
So a micro-batch is computed the same whichever process runs it, and 1 process x 2 micro-batches is bitwise 2
processes x 1 (a sum of two terms is commutative; with more, the reduction's order may differ in the last bit).
The model is initialized from the run seed and broadcast from rank 0 (identical init); rank 0 alone writes
checkpoints, stats and the final weights.  With one process and one micro-batch all of this is the identity, so
such a run is bitwise the same as before this module existed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from core.errors import ConfigError

from .device import resolve_device


@dataclass(frozen=True)
class Group:
    """This process's place in the training job: rank among world_size processes, GPU local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_spec: str, devices: int = 1, nodes: int = 1) -> tuple[Group, torch.device]:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and this
    rank's device; a plain process is the one-process group.  WORLD_SIZE must be nodes x devices (train.nodes,
    train.devices), and `auto` must find CUDA where the job holds GPUs (common/device.py)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != nodes * devices:
        raise ConfigError(f"train.nodes x train.devices is {nodes} x {devices} but this job has WORLD_SIZE={world} "
                          f"processes: {_launch_hint(devices, nodes)}")
    device = resolve_device(device_spec, check_allocation=True)
    if world == 1:
        return Group(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank} has LOCAL_RANK {local_rank} but sees {torch.cuda.device_count()} GPU(s): "
                              f"give each node train.devices ({devices}) GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Group(rank, world, local_rank), device


def _launch_hint(devices: int, nodes: int) -> str:
    if nodes > 1:
        return (f"start `torchrun --nnodes {nodes} --nproc_per_node {devices} --rdzv-backend c10d ...` once per node "
                "(the workflow's launcher, `launch_prefix`, does it with srun)")
    if devices > 1:
        return f"launch with `torchrun --nproc_per_node {devices}`"
    return "launch without torchrun, or set train.devices (and train.nodes) to match WORLD_SIZE"


def shard(indices: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's contiguous slice of the step's global batch: the ranks together cover it exactly once."""
    per_rank = len(indices) // group.world_size
    return indices[group.rank * per_rank:(group.rank + 1) * per_rank]


def micro_batches(indices: torch.Tensor, group: Group, accum: int):
    """(j, indices) of this rank's `accum` micro-batches: global micro-batch j = rank * accum + a is the j-th
    contiguous slice of the step's batch, so the same j gets the same rows whichever process runs it."""
    size = len(indices) // (group.world_size * accum)
    for a in range(accum):
        j = group.rank * accum + a
        yield j, indices[j * size:(j + 1) * size]


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps `seed` (one process = the single-process run); other ranks get independent streams."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, group: Group) -> None:
    """Rank 0's parameters and buffers everywhere (identical init even if a rank's RNG drifted)."""
    if group.active:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


@torch.no_grad()
def average_gradients(params, group: Group, micro_batches: int = 1, bucket_bytes: int = 25 * 2**20) -> None:
    """Replace every gradient, a sum over this rank's `micro_batches`, by the mean over all ranks' micro-batches.

    All-reduce sum, then one division by world_size x micro_batches (DDP's arithmetic with one micro-batch), in
    flat buckets of about 25 MB.  Every rank must hold the same set of gradients (the same code path runs on every
    rank); parameters without a gradient stay without one, as in a single process.
    """
    total = group.world_size * micro_batches
    if total == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not group.active:
        for g in grads:
            g /= total
        return
    bucket, size = [], 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket, total)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, total)


def _reduce_bucket(grads: list[torch.Tensor], total: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= total
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_true(flag: bool, group: Group, device: torch.device) -> bool:
    """True only if `flag` holds on every rank: a step is taken or skipped by all ranks together."""
    if not group.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_scalars(values: dict[str, float], group: Group, device: torch.device) -> dict[str, float]:
    """The ranks' mean of each logged scalar (same keys on every rank), so stats.jsonl describes the global batch."""
    if not group.active or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / group.world_size).tolist(), strict=True))


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


RDZV_PORT = 29500  # the rendezvous port on the first node; CMBENCH_RDZV_PORT overrides it when the job starts


def launch_prefix(python: str, devices: int, nodes: int = 1) -> str:
    """How a Snakemake rule starts the CLI: plain, torchrun with one process per device, or on several nodes one
    torchrun per node started by srun (docs/cluster.md, "Data, memory and multi-node").

    The rule runs inside the SLURM plugin's one-task srun step on the first node, which holds that node's CPUs and
    GPUs: the inner step needs --overlap to share them, and --ntasks because the outer step's SLURM_NTASKS=1
    would otherwise shrink it to one node.  The first host of the allocation hosts the rendezvous.
    """
    if nodes <= 1:
        if devices <= 1:
            return f"{python} -m common.cli"
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node {devices} -m common.cli"
    host = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
    endpoint = f'"{host}:${{CMBENCH_RDZV_PORT:-{RDZV_PORT}}}"'
    srun = f"srun --overlap --nodes {nodes} --ntasks {nodes} --ntasks-per-node 1 --kill-on-bad-exit=1"
    job_id = '"$SLURM_JOB_ID"'
    return f"{srun} {torchrun_nodes(python, devices, nodes, endpoint, job_id)}"


def torchrun_nodes(python: str, devices: int, nodes: int, endpoint: str, rdzv_id: str) -> str:
    """One node's torchrun of a `nodes`-node job: c10d rendezvous at `endpoint` (host:port), job id `rdzv_id`."""
    return (f"{python} -m torch.distributed.run --nnodes {nodes} --nproc_per_node {devices} --rdzv-backend c10d "
            f"--rdzv-endpoint {endpoint} --rdzv-id {rdzv_id} -m common.cli")

"""Data-parallel training over several processes (torchrun), one GPU each on CUDA, gloo processes on CPU.

Why not the DistributedDataParallel wrapper: DDP syncs gradients through hooks that fire only when the loss flows
through `DDP.forward`.  Our methods call other entry points of the model (`model.consistency`, the parameterization
wrappers) and sCT/sCD/FACM take `torch.func.jvp` of it, which bypasses DDP's reducer: gradients would silently stay
per-rank.  So the loop averages gradients itself after backward (`average_gradients`, one all-reduce per bucket),
which is DDP's arithmetic without its overlap of communication and backward, and correct for every method.

Conventions (identical across ranks unless said): the global batch is `train.batch_size`; rank r takes the r-th
contiguous slice of the step's global indices (different data shards); the model is initialized from the run seed
and broadcast from rank 0 (identical init); each rank reseeds its RNG per step with a rank-specific seed (different
noise); rank 0 alone writes checkpoints, stats and the final weights.  With one process all of this is the identity,
so a one-process run is bitwise the same as before this module existed.
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


def setup(device_spec: str, devices: int = 1) -> tuple[Group, torch.device]:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and this
    rank's device; a plain process is the one-process group.  `devices` (train.devices) must match WORLD_SIZE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != devices:
        how = (f"launch with `torchrun --nproc_per_node {devices}`" if devices > 1
               else "launch without torchrun, or set train.devices to WORLD_SIZE")
        raise ConfigError(f"train.devices is {devices} but this job has WORLD_SIZE={world} processes: {how}")
    if world == 1:
        return Group(), resolve_device(device_spec)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Group(rank, world, local_rank), device


def shard(indices: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's contiguous slice of the step's global batch: the ranks together cover it exactly once."""
    per_rank = len(indices) // group.world_size
    return indices[group.rank * per_rank:(group.rank + 1) * per_rank]


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
def average_gradients(params, group: Group, bucket_bytes: int = 25 * 2**20) -> None:
    """Replace every gradient by its mean over ranks (what DDP computes), in flat buckets of about 25 MB.

    Every rank must hold the same set of gradients (the same code path runs on every rank); parameters without a
    gradient stay without one, as in a single process.
    """
    if not group.active:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket, group)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, group)


def _reduce_bucket(grads: list[torch.Tensor], group: Group) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= group.world_size
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


def launch_prefix(python: str, devices: int) -> str:
    """How a Snakemake rule starts the CLI: plain, or torchrun with one process per device."""
    if devices <= 1:
        return f"{python} -m common.cli"
    return f"{python} -m torch.distributed.run --standalone --nproc_per_node {devices} -m common.cli"

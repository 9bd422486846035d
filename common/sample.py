"""Sampling with per-image seeds, so samples do not depend on batch size or device count (EDM generate.py).

Image i of a sampling run with seed S draws all of its randomness (latent, re-noising, label) from its own
generator, seeded with the pair (S, i).  Any batching of the N images therefore yields the same samples.
The generators are NumPy PCG64 streams: torch's CPU generator keeps only 32 bits of a seed (seeds S * 2^32 + i
collide across S), and drawing on the host makes the noise identical on CPU and CUDA.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from methods.base import Method

from . import shards
from .progress import Progress


class StackedRandomGenerator:
    """One torch.Generator per image; `randn(like)` stacks one draw from each."""

    def __init__(self, device: torch.device, seeds: list[tuple[int, int]]):
        self.device = device
        self.generators = [np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(s)))) for s in seeds]

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        shape = tuple(like.shape[1:])
        dtype = np.float64 if like.dtype == torch.float64 else np.float32
        noise = np.stack([g.standard_normal(shape, dtype=dtype) for g in self.generators])
        return torch.from_numpy(noise).to(device=self.device, dtype=like.dtype)

    def randint(self, high: int) -> torch.Tensor:
        return torch.tensor([int(g.integers(high)) for g in self.generators], device=self.device)


def image_seeds(seed: int, start: int, stop: int) -> list[tuple[int, int]]:
    return [(seed, i) for i in range(start, stop)]


@torch.no_grad()
def generate(method: Method, model: torch.nn.Module, item_shape: tuple[int, ...], n: int, steps: int, seed: int,
             batch_size: int, device: torch.device, label_dim: int = 0, start: int = 0, on_batch=None):
    """Return (samples, latents, labels) of images start..n-1 as CPU float32 tensors (labels int64 or None).

    Batches start at `start` and step by `batch_size`; `on_batch(k)` is called after each batch of k images."""
    model.eval()
    samples, latents, labels_out = [], [], []
    for lo in range(start, n, batch_size):
        hi = min(n, lo + batch_size)
        rng = StackedRandomGenerator(device, image_seeds(seed, lo, hi))
        z = rng.randn(torch.empty((hi - lo, *item_shape), device=device))
        labels = rng.randint(label_dim) if label_dim > 0 else None
        x = method.sample(model, z, steps, randn=rng.randn, labels=labels)
        samples.append(x.float().cpu())
        latents.append(z.float().cpu())
        if labels is not None:
            labels_out.append(labels.cpu())
        if on_batch is not None:
            on_batch(hi - lo)
    return torch.cat(samples), torch.cat(latents), (torch.cat(labels_out) if labels_out else None)


def generate_sharded(method: Method, model: torch.nn.Module, item_shape: tuple[int, ...], n: int, steps: int,
                     seed: int, batch_size: int, device: torch.device, label_dim: int, parts: Path, key: dict,
                     shard_images: int | None = None, progress: Progress | None = None):
    """`generate` in shards written to `parts` (each tagged with `key` and its range); shards a killed attempt
    left with the same key are read instead of drawn.  Shards hold whole batches, so the samples are bitwise
    those of `generate` with this batch size.  Returns (samples, latents, labels or None, seconds spent drawing,
    summed over the attempts that drew them) as NumPy arrays."""
    size = shards.shard_size(batch_size, shard_images)
    out, seconds = [], 0.0
    for index, (lo, hi) in enumerate(shards.ranges(n, size)):
        file, shard_key = shards.path(parts, index), {**key, "start": lo, "stop": hi, "batch_size": batch_size}
        shapes = {"samples": (hi - lo, *item_shape), "latents": (hi - lo, *item_shape)}
        if label_dim > 0:
            shapes["labels"] = (hi - lo,)
        found = shards.read(file, shard_key, shapes)
        if found is not None:
            arrays, info = found
            if progress is not None:
                progress.skip(hi - lo)
        else:
            tick = time.perf_counter()
            x, z, y = generate(method, model, item_shape, hi, steps, seed, batch_size, device, label_dim, start=lo,
                               on_batch=progress.update if progress is not None else None)
            info = {"seconds": time.perf_counter() - tick}
            arrays = {"samples": x.numpy(), "latents": z.numpy(), **({"labels": y.numpy()} if y is not None else {})}
            shards.write(file, arrays, shard_key, info)
        out.append(arrays)
        seconds += float(info.get("seconds", 0.0))
    labels = np.concatenate([a["labels"] for a in out]) if label_dim > 0 else None
    return (np.concatenate([a["samples"] for a in out]), np.concatenate([a["latents"] for a in out]), labels,
            seconds)

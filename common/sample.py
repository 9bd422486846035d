"""Sampling with per-image seeds, so samples do not depend on batch size or device count (EDM generate.py).

Image i of a sampling run with seed S draws all of its randomness (latent, re-noising, label) from its own
generator, seeded with the pair (S, i).  Any batching of the N images therefore yields the same samples.
The generators are NumPy PCG64 streams: torch's CPU generator keeps only 32 bits of a seed (seeds S * 2^32 + i
collide across S), and drawing on the host makes the noise identical on CPU and CUDA.
"""

from __future__ import annotations

import numpy as np
import torch

from methods.base import Method


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
             batch_size: int, device: torch.device, label_dim: int = 0):
    """Return (samples, latents, labels) as CPU float32 tensors (labels int64 or None)."""
    model.eval()
    samples, latents, labels_out = [], [], []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        rng = StackedRandomGenerator(device, image_seeds(seed, start, stop))
        z = rng.randn(torch.empty((stop - start, *item_shape), device=device))
        labels = rng.randint(label_dim) if label_dim > 0 else None
        x = method.sample(model, z, steps, randn=rng.randn, labels=labels)
        samples.append(x.float().cpu())
        latents.append(z.float().cpu())
        if labels is not None:
            labels_out.append(labels.cpu())
    return torch.cat(samples), torch.cat(latents), (torch.cat(labels_out) if labels_out else None)

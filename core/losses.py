"""Per-sample distances of the consistency losses: one home, one rule for the pseudo-Huber constant."""

from __future__ import annotations

import math
from typing import Literal

import torch

Distance = Literal["l2", "pseudo_huber"]


def _flat_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b as [N, D] in at least float32 (a bf16 network output is compared in float32)."""
    diff = (a - b).flatten(1)
    return diff.to(torch.promote_types(diff.dtype, torch.float32))


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 sqrt(D) (Song & Dhariwal 2023, section 3.3)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(||a - b||_2^2 + c^2) - c per sample, the norm over all D dimensions of a sample (not elementwise).

    c = None is iCT's 0.00054 sqrt(D); c = 0 is the plain L2 norm (ECT on CIFAR-10)."""
    diff = _flat_difference(a, b)
    c = ict_huber_c(diff.shape[1]) if c is None else c
    return (diff.square().sum(1) + c**2).sqrt() - c


def mean_squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean_D (a - b)^2 per sample: CM's `l2` distance."""
    return _flat_difference(a, b).square().mean(1)


def consistency_distance(a: torch.Tensor, b: torch.Tensor, kind: Distance, c: float | None = None) -> torch.Tensor:
    """The distance d of a consistency loss by name: "l2" (mean_squared) or "pseudo_huber" (c as there).

    LPIPS, the CM and CTM papers' best distance, needs VGG weights that cannot be shipped; runs are labelled
    with the distance they used."""
    if kind == "l2":
        return mean_squared(a, b)
    if kind == "pseudo_huber":
        return pseudo_huber(a, b, c)
    raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {kind!r}")

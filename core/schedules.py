"""Noise-level grids and training-time distributions shared by the methods."""

from __future__ import annotations

import torch

from .conventions import RHO, SIGMA_MAX, SIGMA_MIN


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  device=None, dtype=torch.float64) -> torch.Tensor:
    """The Karras grid, descending: sigma_0 = sigma_max, ..., sigma_{n-1} = sigma_min (EDM eq. 5).

    n = 1 gives [sigma_max] (a single jump from pure noise).
    """
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1, got {n}")
    if n == 1:
        return torch.tensor([sigma_max], device=device, dtype=dtype)
    i = torch.arange(n, device=device, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / (n - 1) * (lo - hi)) ** rho


def lognormal_sigma(n: int, p_mean: float, p_std: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2), EDM's training distribution of noise levels."""
    return (torch.randn(n, device=device, dtype=dtype) * p_std + p_mean).exp()

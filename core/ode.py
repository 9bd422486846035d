"""Probability-flow ODE steps on a denoiser, in the EDM sigma convention (Karras et al. 2022, Algorithm 1).

Shared by the teacher's sampler, by CD's and CTM's teacher solver steps, and by the analytic teacher.
"""

from __future__ import annotations

import torch

from .conventions import Denoiser, per_sample


def euler_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    sigma, sigma_next = per_sample(sigma, x), per_sample(sigma_next, x)
    d = (x - denoiser(x, sigma)) / sigma
    return x + (sigma_next - sigma) * d


def heun_step(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One 2nd-order Heun step from sigma to sigma_next; an Euler step where sigma_next = 0 (EDM Alg. 1)."""
    sigma, sigma_next = per_sample(sigma, x), per_sample(sigma_next, x)
    d = (x - denoiser(x, sigma)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if torch.all(sigma_next == 0):
        return x_euler
    d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
    x_heun = x + (sigma_next - sigma) * 0.5 * (d + d_next)
    return torch.where(sigma_next == 0, x_euler, x_heun)


def heun_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate from sigmas[0] through the grid to 0: len(sigmas) steps, 2 len(sigmas) - 1 evaluations."""
    grid = torch.cat([sigmas, sigmas.new_zeros(1)])
    for sigma, sigma_next in zip(grid[:-1], grid[1:], strict=True):
        ones = x.new_ones(x.shape[0])
        x = heun_step(denoiser, x, ones * sigma, ones * sigma_next)
    return x

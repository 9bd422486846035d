"""Multistep consistency sampling (Song et al. 2023, Algorithm 1), shared by CD, CT, iCT and ECT.

Samplers take standard-normal latents and return data-space samples; each method passes its own consistency
function f(x, sigma) (EDM sigma convention) and its intermediate noise levels.  `released_ts_sigmas` reads the
levels the way openai/consistency_models' `--ts i,j,... --steps n` gives them (indices into a Karras grid).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .conventions import RHO, SIGMA_MAX, SIGMA_MIN
from .schedules import karras_sigmas


def intermediate_levels(steps: int, given: list[float], default: Callable[[int], list[float]]) -> list[float]:
    """The steps - 1 levels (or times) a multistep sampler visits after its start: `given[:steps - 1]` when the list
    is long enough (the papers tune them, e.g. 0.821 for 2 steps on CIFAR-10), else `default(steps)`, so any step
    count has a defined schedule."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps - 1 <= len(given):
        return list(given[: steps - 1])
    return default(steps)


def multistep_sigmas(steps: int, mid_sigmas: list[float], sigma_max: float = SIGMA_MAX,
                     sigma_min: float = SIGMA_MIN, rho: float = RHO) -> list[float]:
    """[sigma_max, then steps - 1 intermediate levels], descending; beyond `mid_sigmas`, the interior points of a
    Karras grid of steps + 1 levels from sigma_max to sigma_min."""
    mids = intermediate_levels(steps, mid_sigmas,
                               lambda n: karras_sigmas(n + 1, sigma_min, sigma_max, rho)[1:-1].tolist())
    levels = [sigma_max, *mids]
    if any(b >= a for a, b in zip(levels[:-1], levels[1:], strict=True)) or levels[-1] <= sigma_min:
        raise ValueError(f"intermediate sigmas must descend from {sigma_max} and stay above {sigma_min}: {levels}")
    return levels


def released_ts_sigmas(ts: list[int], levels: int, sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN,
                       rho: float = RHO) -> list[float]:
    """The intermediate levels of openai/consistency_models' multistep sampler (`stochastic_iterative_sampler`) for
    `--ts ts --steps levels`: sigma(i) = (sigma_max^(1/rho) + i/(levels - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho for the interior entries ts[1:-1].  ts[0] = 0 is sigma_max (the start) and
    ts[-1] = levels - 1 is sigma_min, where the released loop adds sqrt(sigma_min^2 - sigma_min^2) = 0 noise, i.e.
    stops: `--ts 0,22,39 --steps 40` is two network evaluations with one intermediate level, sigma(22) = 1.3824."""
    if levels < 2:
        raise ValueError(f"the Karras grid of --ts needs >= 2 levels, got {levels}")
    if len(ts) < 2 or ts[0] != 0 or ts[-1] != levels - 1 or any(b <= a for a, b in zip(ts[:-1], ts[1:], strict=True)):
        raise ValueError(f"ts must increase from 0 (sigma_max) to {levels - 1} (sigma_min), got {ts}")
    grid = karras_sigmas(levels, sigma_min, sigma_max, rho)
    return [float(grid[i]) for i in ts[1:-1]]


def consistency_multistep(f, z: torch.Tensor, sigmas: list[float], randn, sigma_min: float = SIGMA_MIN,
                          clip: tuple[float, float] | None = None):
    """x0 = f(sigma_0 z, sigma_0); for each later level: x = x0 + sqrt(sigma^2 - sigma_min^2) eps, x0 = f(x, sigma).

    clip = (lo, hi) clamps every x0 to [lo, hi], the returned one included, before it is re-noised: the released
    sampler's `clip_denoised` (openai/consistency_models `karras_sample`, default on, with (-1, 1) for images).
    """

    def denoise(x, sigma):
        x0 = f(x, ones * sigma)
        return x0 if clip is None else x0.clamp(*clip)

    ones = z.new_ones(z.shape[0])
    x0 = denoise(z * sigmas[0], sigmas[0])
    for sigma in sigmas[1:]:
        x = x0 + (sigma**2 - sigma_min**2) ** 0.5 * randn(x0)
        x0 = denoise(x, sigma)
    return x0

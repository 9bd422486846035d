"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023, arXiv:2303.01469): distillation (CD) and training (CT).

f_theta(x, sigma) ~ Phi_{sigma -> sigma_min}(x) with f(x, sigma_min) = x built in (CMDenoiser).  CD and CT differ
only in where the target point of a pair on the Karras grid comes from (Algorithms 2 and 3); iCT and ECT share
the parameterization and the multistep sampler (`ConsistencyModel`).  Equations and departures: docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from core.conventions import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, append_dims, require_noise_range
from core.errors import require
from core.jvp import SharedRandomness
from core.losses import Distance, consistency_distance
from core.ode import euler_step, heun_step
from core.precond import CMDenoiser
from core.samplers import consistency_multistep, multistep_sigmas, released_ts_sigmas
from core.schedules import karras_sigmas

from .base import Method, Randn
from .registry import register

DEFAULT_MID_SIGMA = 0.821  # the 2-step level of iCT and ECT on CIFAR-10 (the quick tracks use it too)


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b, strict=True))


def sample_pairs(sigmas: torch.Tensor, n: int, device=None):
    """(i, t = sigma_i, r = sigma_{i+1}) with i ~ U{0, ..., N-2} on a descending grid of N levels."""
    i = torch.randint(0, len(sigmas) - 1, (n,), device=device)
    sigmas = sigmas.to(device)
    return i, sigmas[i], sigmas[i + 1]


def noised_pair(x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 + t eps, x0 + r eps) with one eps ~ N(0, I): consistency training's one-sample estimate of the ODE step
    (CT's target point, iCT's and ECT's pairs)."""
    eps = torch.randn_like(x0)
    return x0 + append_dims(t, x0.ndim) * eps, x0 + append_dims(r, x0.ndim) * eps


@dataclass(frozen=True)
class ConsistencyModel(Method):
    """CM's parameterization and multistep sampler (Algorithm 1), shared by CD, CT, iCT and ECT.

    noise_scale: c_noise = noise_scale ln(sigma); 0.25 is EDM's (a teacher-initialized student starts as the
    teacher, and what the CIFAR-10 JAX code uses), the PyTorch openai/consistency_models (ImageNet-64, LSUN) uses
    250.  mid_sigmas: the sampler's intermediate levels (0.821 is the 2-step level of iCT and ECT on CIFAR-10);
    more steps than listed use a Karras grid.  ts, ts_levels: the same levels as openai/consistency_models'
    `--ts 0,22,39 --steps 40` (indices into a Karras grid of ts_levels levels, from 0 = sigma_max to
    ts_levels - 1 = sigma_min); when given they set mid_sigmas.  clip_denoised: clamp every x0 to [-1, 1] (the image
    range) before it is re-noised and at the end, as the released sampler does; off by default because the
    analytic mixture's data are not bounded.
    """

    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO
    noise_scale: float = 0.25
    mid_sigmas: list[float] = field(default_factory=lambda: [DEFAULT_MID_SIGMA])
    ts: list[int] = field(default_factory=list)
    ts_levels: int | None = None
    clip_denoised: bool = False

    def __post_init__(self):
        require_noise_range(self.sigma_min, self.sigma_max, self.sigma_data)
        require(self.rho > 0, "rho", "must be > 0")
        require(self.noise_scale > 0, "noise_scale", "must be > 0")
        require(isinstance(self.clip_denoised, bool), "clip_denoised", "must be true or false")
        if self.ts or self.ts_levels is not None:
            levels = self.ts_levels
            require(isinstance(levels, int) and levels >= 2, "ts_levels",
                    "must be an integer >= 2 with ts (the released --steps: the Karras grid the indices point into)")
            require(len(self.ts) >= 2 and self.ts[0] == 0 and self.ts[-1] == levels - 1
                    and all(b > a for a, b in zip(self.ts[:-1], self.ts[1:], strict=True)), "ts",
                    f"must increase from 0 (sigma_max) to ts_levels - 1 = {levels - 1} (sigma_min), as the released "
                    f"--ts (e.g. [0, 22, 39] with ts_levels 40)")
            mids = released_ts_sigmas(self.ts, levels, self.sigma_max, self.sigma_min, self.rho)
            given = [float(v) for v in self.mid_sigmas]
            require(given == [DEFAULT_MID_SIGMA] or _close(given, mids), "mid_sigmas",
                    "give the intermediate levels either as mid_sigmas or as ts, not both")
            object.__setattr__(self, "mid_sigmas", mids)  # the resolved config shows the levels the sampler uses
        levels = [self.sigma_max, *self.mid_sigmas]
        require(all(b < a for a, b in zip(levels[:-1], levels[1:], strict=True)) and levels[-1] > self.sigma_min,
                "mid_sigmas", f"must descend inside ({self.sigma_min}, {self.sigma_max})")

    def build_model(self, backbone):
        return CMDenoiser(backbone, self.sigma_data, self.sigma_min, self.noise_scale)

    def sample(self, model, z, steps, *, randn: Randn, labels=None):
        sigmas = multistep_sigmas(steps, self.mid_sigmas, self.sigma_max, self.sigma_min, self.rho)
        clip = (-1.0, 1.0) if self.clip_denoised else None
        return consistency_multistep(lambda x, s: model(x, s, labels), z, sigmas, randn, self.sigma_min, clip=clip)


@dataclass(frozen=True)
class _GridPairs(ConsistencyModel):
    """CD and CT: a pair of adjacent levels of a Karras grid of N levels, lambda = 1, an EMA target theta-."""

    distance: Distance = "l2"

    def num_scales(self, progress: float) -> int:
        """N: the number of levels of the Karras grid at this point of training."""
        raise NotImplementedError

    def target_point(self, x0, x_t, t, r, eps, teacher) -> torch.Tensor:
        """x_r, the point whose target-network output is the regression target (no gradient)."""
        raise NotImplementedError

    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        n = self.num_scales(progress)
        sigmas = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho).float()  # (mps has no float64)
        _, t, r = sample_pairs(sigmas, x0.shape[0], x0.device)
        eps = torch.randn_like(x0)
        x_t = x0 + append_dims(t, x0.ndim).to(x0.dtype) * eps
        with torch.no_grad():
            x_r = self.target_point(x0, x_t, t, r, eps, teacher)
        target = model if target is None else target  # theta- = sg(theta) if the caller keeps no EMA copy
        rng = SharedRandomness(x0.device)  # the same dropout mask for both calls (official: saved RNG state)
        with rng.replay():
            f_t = model(x_t, t, labels)
        with torch.no_grad(), rng.replay():
            f_r = target(x_r, r, labels)
        d = consistency_distance(f_t, f_r.detach(), self.distance)  # lambda(t) = 1
        return {"loss": d.mean(), "N": torch.tensor(float(n)), "mu": torch.tensor(self.target_decay(progress)),
                "mean_t": t.mean()}


@register
@dataclass(frozen=True)
class CD(_GridPairs):
    """Consistency distillation (Algorithm 2): x_r by one ODE step of the teacher; N = 18 and mu = 0 (CIFAR-10,
    Table 3; ImageNet-64 uses N = 40, mu = 0.95).  Starts from the teacher's weights."""

    name = "cd"
    needs_teacher = True
    default_init = "teacher"
    N: int = 18
    target_ema: float = 0.0
    solver: Literal["heun", "euler"] = "heun"

    def __post_init__(self):
        super().__post_init__()
        require(self.N >= 2, "N", "must be >= 2 (a pair of adjacent levels)")
        require(0.0 <= self.target_ema < 1.0, "target_ema", "must lie in [0, 1)")

    def num_scales(self, progress):
        return self.N

    def target_point(self, x0, x_t, t, r, eps, teacher):
        if teacher is None:
            raise ValueError("cd distills a teacher: pass teacher= (the loop does)")
        step = heun_step if self.solver == "heun" else euler_step
        return step(teacher.denoise, x_t, t, r)

    def target_decay(self, progress):
        return self.target_ema


@register
@dataclass(frozen=True)
class CT(_GridPairs):
    """Consistency training (Algorithm 3): x_r = x0 + r eps with the same eps; N(k) and mu(k) grow with training
    (App. C, CIFAR-10: s0 = 2, s1 = 150, mu0 = 0.9).  Trained from random weights."""

    name = "ct"
    default_init = "random"
    s0: int = 2
    s1: int = 150
    mu0: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        require(self.s0 >= 1, "s0", "must be >= 1")
        require(self.s1 >= self.s0, "s1", "must be >= s0")
        require(0.0 < self.mu0 < 1.0, "mu0", "must lie in (0, 1)")

    def num_scales(self, progress):
        """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, k/K = progress."""
        n = math.ceil(math.sqrt(progress * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2) - 1) + 1
        return max(n, 2)  # the official code's max(., 1) + 1

    def target_point(self, x0, x_t, t, r, eps, teacher):
        return x0 + append_dims(r, x0.ndim).to(x0.dtype) * eps

    def target_decay(self, progress):
        """mu(k) = exp(s0 ln(mu0) / N(k)), the paper's formula (both official codes divide by N(k) - 1)."""
        return math.exp(self.s0 * math.log(self.mu0) / self.num_scales(progress))

"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023, arXiv:2303.01469): distillation (CD) and training (CT).

Both learn f_theta(x, sigma) ~ Phi_{sigma -> sigma_min}(x), the PF-ODE flow map to the data end, with the boundary
condition f(x, sigma_min) = x built into the parameterization (common.precond.CMDenoiser, App. C), and differ
only in where the target point of a pair on the Karras grid comes from (Algorithms 2 and 3):

    i ~ U{0, ..., N-2},  t = sigma_i > r = sigma_{i+1},  eps ~ N(0, I),  x_t = x0 + t eps
    CD: x_r = one Heun (or Euler) step of the teacher PF-ODE from (x_t, t) to r
    CT: x_r = x0 + r eps (the same eps: the one-sample score estimate)
    loss = lambda d(f_theta(x_t, t), sg f_theta-(x_r, r)),  lambda = 1,  theta- <- mu theta- + (1 - mu) theta

Distance: the paper's best results use LPIPS on images upsampled to 224; LPIPS needs VGG weights that cannot be
fetched offline, so d is "l2" (the per-sample mean of squared errors, the official `l2` loss) or "pseudo_huber"
(iCT's sqrt(||x - y||^2 + c^2) - c on the per-sample L2 norm, c = 0.00054 sqrt(D)); results are labelled with it.

c_noise = noise_scale ln(sigma): 0.25 by default (EDM's ln(sigma)/4, so CD, which starts from the EDM teacher's
weights, starts as the teacher up to CM's boundary coefficients); the official openai/consistency_models code uses
250 (its 1000 * 0.25 `rescaled_t`), available as `noise_scale: 250`.

Sampler (Algorithm 1): x0 = f(sigma_max z, sigma_max), then x = x0 + sqrt(tau^2 - sigma_min^2) eps, x0 = f(x, tau)
for each intermediate level tau.  The paper found the levels by ternary search per model; the default 0.821 is
iCT's / ECT's CIFAR-10 2-step value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from common.conventions import append_dims
from common.jvp import SharedRandomness
from common.ode import euler_step, heun_step
from common.precond import CMDenoiser
from common.samplers import consistency_multistep, multistep_sigmas
from common.schedules import karras_sigmas

from .base import Method, Randn
from .registry import register


def sample_pairs(sigmas: torch.Tensor, n: int, device=None):
    """(i, t = sigma_i, r = sigma_{i+1}) with i ~ U{0, ..., N-2} on a descending grid of N levels."""
    i = torch.randint(0, len(sigmas) - 1, (n,), device=device)
    sigmas = sigmas.to(device)
    return i, sigmas[i], sigmas[i + 1]


def cm_distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample distance [N]: "l2" = mean over dimensions of (a - b)^2; "pseudo_huber" = sqrt(||a - b||^2 + c^2)
    - c with c = 0.00054 sqrt(D) (Song & Dhariwal 2023)."""
    diff = (a - b).flatten(1).float()
    if kind == "l2":
        return diff.square().mean(1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff.shape[1])
        return (diff.square().sum(1) + c**2).sqrt() - c
    raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {kind!r}")


@dataclass(frozen=True)
class ConsistencyModel(Method):
    """What CD and CT share: parameterization, pairs on the Karras grid, distance, loss and sampler."""

    distance: Literal["l2", "pseudo_huber"] = "l2"
    noise_scale: float = 0.25
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    mid_sigmas: list[float] = field(default_factory=lambda: [0.821])

    # -- what CD and CT define differently
    def num_scales(self, progress: float) -> int:
        """N: the number of levels of the Karras grid at this point of training."""
        raise NotImplementedError

    def target_point(self, x0, x_t, t, r, eps, teacher) -> torch.Tensor:
        """x_r, the point whose target-network output is the regression target (no gradient)."""
        raise NotImplementedError

    # -- shared
    def build_model(self, backbone):
        return CMDenoiser(backbone, self.sigma_data, self.sigma_min, self.noise_scale)

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
        d = cm_distance(f_t, f_r.detach(), self.distance)  # lambda(t) = 1
        return {"loss": d.mean(), "N": torch.tensor(float(n)), "mu": torch.tensor(self.target_decay(progress)),
                "mean_t": t.mean()}

    def sample(self, model, z, steps, *, randn: Randn, labels=None):
        sigmas = multistep_sigmas(steps, self.mid_sigmas, self.sigma_max, self.sigma_min, self.rho)
        return consistency_multistep(lambda x, s: model(x, s, labels), z, sigmas, randn, self.sigma_min)

    def nfe(self, steps: int) -> int:
        return steps


@register
@dataclass(frozen=True)
class CD(ConsistencyModel):
    """Consistency distillation (Algorithm 2): x_r by one ODE step of the teacher; N = 18 and mu = 0 (CIFAR-10,
    Table 3; ImageNet-64 uses N = 40, mu = 0.95).  Starts from the teacher's weights.

    On the analytic track mu = 0.95 is far better in short runs (2-D mixture, 1500 iterations: 1-step flow-map
    error 0.025 vs 0.14 with mu = 0), so the quick-track config may set it; the default stays the paper's.
    """

    name = "cd"
    needs_teacher = True
    default_init = "teacher"
    N: int = 18
    target_ema: float = 0.0
    solver: Literal["heun", "euler"] = "heun"

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
class CT(ConsistencyModel):
    """Consistency training (Algorithm 3): x_r = x0 + r eps with the same eps; N(k) and mu(k) grow with training
    (App. C, CIFAR-10: s0 = 2, s1 = 150, mu0 = 0.9).  Trained from random weights."""

    name = "ct"
    default_init = "random"
    s0: int = 2
    s1: int = 150
    mu0: float = 0.9

    def num_scales(self, progress):
        """N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, k/K = progress."""
        n = math.ceil(math.sqrt(progress * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2) - 1) + 1
        return max(n, 2)  # the official code's max(., 1) + 1

    def target_point(self, x0, x_t, t, r, eps, teacher):
        return x0 + append_dims(r, x0.ndim).to(x0.dtype) * eps

    def target_decay(self, progress):
        """mu(k) = exp(s0 ln(mu0) / N(k)) as in the paper (App. C), so mu(0) = mu0.

        Both official codes (openai/consistency_models `create_ema_and_scales_fn`, consistency_models_cifar10
        `get_ema_scales_fn`) divide by N(k) - 1 instead (they compute mu before adding 1 to the level count), so
        their mu starts at mu0^2 = 0.81; we follow the paper's formula (METHODS.md 2).
        """
        return math.exp(self.s0 * math.log(self.mu0) / self.num_scales(progress))

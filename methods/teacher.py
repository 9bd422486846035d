"""The diffusion teacher: EDM preconditioning, loss and Heun sampler (Karras et al. 2022).  The quality reference
of every table and, through `as_teacher` (core.conventions.ConvertedTeacher), what the distillation methods
distill; on gmm data the exact mixture (core.gmm) plugs into the same interface."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.conventions import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, ConvertedTeacher, append_dims, require_noise_range
from core.errors import require
from core.ode import heun_sample
from core.precond import EDMDenoiser
from core.schedules import karras_sigmas, lognormal_sigma

from .base import Method, Randn
from .registry import register


@register
@dataclass(frozen=True)
class EDMTeacher(Method):
    """ln sigma ~ N(P_mean, P_std^2); loss (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 ||D - x0||^2, averaged over
    data dimensions (EDM sums them; with Adam this only rescales the gradient)."""

    name = "teacher"
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO

    def __post_init__(self):
        require_noise_range(self.sigma_min, self.sigma_max, self.sigma_data)
        require(self.P_std > 0, "P_std", "must be > 0")
        require(self.rho > 0, "rho", "must be > 0")

    def build_model(self, backbone):
        return EDMDenoiser(backbone, self.sigma_data)

    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        sigma = lognormal_sigma(x0.shape[0], self.P_mean, self.P_std, device=x0.device)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(x0) * append_dims(sigma, x0.ndim)
        denoised = model(x0 + noise, sigma, labels)
        per_sample = ((denoised - x0) ** 2).flatten(1).mean(1)
        return {"loss": (weight * per_sample).mean(), "mse": per_sample.mean()}

    def sample(self, model, z, steps, *, randn: Randn, labels=None):
        """Deterministic Heun on the Karras grid: `steps` steps, 2 steps - 1 evaluations (18 steps = 35 NFE)."""
        sigmas = karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho, device=z.device)
        return heun_sample(lambda x, s: model(x, s, labels), z * self.sigma_max, sigmas.to(z.dtype))

    def nfe(self, steps: int) -> int:
        return 2 * steps - 1

    def as_teacher(self, model, labels=None) -> ConvertedTeacher:
        """The trained denoiser in every convention, for distillation (no gradients flow into it)."""
        model = model.eval().requires_grad_(False)
        return ConvertedTeacher(lambda x, sigma, batch_labels=labels: model(x, sigma, batch_labels), self.sigma_data,
                                name="edm")

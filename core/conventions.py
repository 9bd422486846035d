"""Time conventions, parameterizations and the one conversion layer (docs/methods.md, Conventions).

Every method owns its internal time; at its boundary everything speaks the EDM sigma convention
(x = x0 + sigma * eps, data at sigma = 0).  The conversions keep the signal-to-noise ratio and map a
point to the same point rescaled:

- TrigFlow (sCM):  x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I).  sigma = sigma_d tan(t),
  x_trig = cos(t) x_sigma.
- rectified flow (FACM, data at t = 1):  x_t = t x0 + (1 - t) eps.  sigma = (1 - t) / t,
  x_rf = t x_sigma.

A denoiser D(x_sigma, sigma) -> E[x0 | x_sigma] is the convention-free quantity; every PF-ODE velocity
follows from it by the chain rule (derivations in the docstrings below).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import require

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0



def require_noise_range(sigma_min: float, sigma_max: float, sigma_data: float = SIGMA_DATA) -> None:
    """The checks every method in EDM sigma shares: 0 < sigma_min < sigma_max and sigma_data > 0."""
    require(0 < sigma_min < sigma_max, "sigma_min", "must satisfy 0 < sigma_min < sigma_max")
    require(sigma_data > 0, "sigma_data", "must be > 0")


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""D(x_sigma, sigma) -> estimate of x0; sigma broadcastable against x."""


def append_dims(v: torch.Tensor | float, ndim: int) -> torch.Tensor:
    """Reshape a per-sample vector [N] to [N, 1, ..., 1] so it broadcasts against an ndim tensor."""
    v = torch.as_tensor(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def per_sample(v: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A time or noise level (float, [N] or [N, 1, ...]) as x's dtype and device, broadcastable against x."""
    return append_dims(torch.as_tensor(v, dtype=x.dtype, device=x.device), x.ndim)


def time_vector(v: torch.Tensor | float, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A time or noise level (a float, or a tensor of 1 or N entries) as an [N] vector on x's device, in `dtype`
    when given (a tensor keeps its dtype otherwise).  Forward-mode tangents pass through."""
    if isinstance(v, torch.Tensor):
        v = v.to(device=x.device, dtype=dtype or v.dtype)
    else:
        v = torch.tensor(float(v), device=x.device, dtype=dtype)
    v = v.reshape(-1)
    if v.shape[0] == 1 and x.shape[0] != 1:
        v = v.expand(x.shape[0])
    if v.shape[0] != x.shape[0]:
        raise ValueError(f"time input has {v.shape[0]} entries for a batch of {x.shape[0]}")
    return v


def coefficient_dtype(x: torch.Tensor) -> torch.dtype:
    """Preconditioning coefficients and times in at least float32, also under bf16 autocast (sCM section 4)."""
    return torch.promote_types(x.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Time maps (all keep the SNR; sigma is the EDM noise level)


def trig_t_from_sigma(sigma, sigma_d: float = SIGMA_DATA):
    return torch.atan(torch.as_tensor(sigma) / sigma_d)


def sigma_from_trig_t(t, sigma_d: float = SIGMA_DATA):
    return sigma_d * torch.tan(torch.as_tensor(t))


def rf_t_from_sigma(sigma):
    return 1.0 / (1.0 + torch.as_tensor(sigma))


def sigma_from_rf_t(t):
    t = torch.as_tensor(t)
    return (1.0 - t) / t


TRIGFLOW_T_MAX = math.atan(SIGMA_MAX / SIGMA_DATA)  # 1.5645: TrigFlow sampling starts here, not at pi/2


# ---------------------------------------------------------------------------------------------------
# State maps: the same point rescaled.


def x_trig_from_sigma(x_sigma: torch.Tensor, sigma, sigma_d: float = SIGMA_DATA) -> torch.Tensor:
    sigma = per_sample(sigma, x_sigma)
    return x_sigma * sigma_d / torch.sqrt(sigma**2 + sigma_d**2)


def x_sigma_from_trig(x_trig: torch.Tensor, t) -> torch.Tensor:
    t = per_sample(t, x_trig)
    return x_trig / torch.cos(t)


def x_rf_from_sigma(x_sigma: torch.Tensor, sigma) -> torch.Tensor:
    sigma = per_sample(sigma, x_sigma)
    return x_sigma / (1.0 + sigma)


def x_sigma_from_rf(x_rf: torch.Tensor, t) -> torch.Tensor:
    t = per_sample(t, x_rf)
    return x_rf / t


# ---------------------------------------------------------------------------------------------------
# PF-ODE velocities from a denoiser, one per convention.


def velocity_sigma(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3 with s(t) = 1, sigma(t) = t)."""
    sigma = per_sample(sigma, x)
    return (x - denoiser(x, sigma)) / sigma


def velocity_trigflow(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor,
                      sigma_d: float = SIGMA_DATA) -> torch.Tensor:
    """dx_t/dt = cos(t) z_hat - sin(t) x0_hat = (cos(t) x_t - D) / sin(t).

    With x0_hat = D(x_t / cos t, sigma_d tan t) and z_hat = (x_t - cos(t) x0_hat) / sin(t).
    """
    t = per_sample(t, x_t)
    x0 = denoiser(x_t / torch.cos(t), sigma_d * torch.tan(t))
    return (torch.cos(t) * x_t - x0) / torch.sin(t)


def trigflow_F(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor,
               sigma_d: float = SIGMA_DATA) -> torch.Tensor:
    """The TrigFlow network output F with dx_t/dt = sigma_d F(x_t / sigma_d, t) (sCM eq. 3)."""
    return velocity_trigflow(denoiser, x_t, t, sigma_d) / sigma_d


def velocity_rf(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx_t/dt = x0_hat - eps_hat = (D - x_t) / (1 - t) for x_t = t x0 + (1 - t) eps (data at t = 1)."""
    t = per_sample(t, x_t)
    x0 = denoiser(x_t / t, (1.0 - t) / t)
    return (x0 - x_t) / (1.0 - t)


def denoiser_from_trigflow_F(F: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                             sigma_d: float = SIGMA_DATA) -> torch.Tensor:
    """x0_hat = cos(t) x_t - sin(t) sigma_d F: the inverse of trigflow_F (sCM eq. 6, the one-step jump)."""
    t = per_sample(t, x_t)
    return torch.cos(t) * x_t - torch.sin(t) * sigma_d * F


def denoiser_from_rf_velocity(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t + (1 - t) v: the inverse of velocity_rf."""
    t = per_sample(t, x_t)
    return x_t + (1.0 - t) * v


class ConvertedTeacher:
    """A denoiser exposed in every convention, so a distillation method asks for what its paper uses.

    `denoiser` may be a trained EDM network (methods.teacher) or the exact analytic mixture (core.gmm).
    """

    def __init__(self, denoiser: Denoiser, sigma_d: float = SIGMA_DATA, name: str = "teacher"):
        self.denoise = denoiser
        self.sigma_d = sigma_d
        self.name = name

    def velocity_sigma(self, x, sigma):
        return velocity_sigma(self.denoise, x, sigma)

    def velocity_trigflow(self, x_t, t):
        return velocity_trigflow(self.denoise, x_t, t, self.sigma_d)

    def trigflow_F(self, x_t, t):
        return trigflow_F(self.denoise, x_t, t, self.sigma_d)

    def velocity_rf(self, x_t, t):
        return velocity_rf(self.denoise, x_t, t)

    def with_labels(self, labels: torch.Tensor | None) -> ConvertedTeacher:
        """This teacher conditioned on one batch's class labels (class-conditional distillation).

        The denoiser of a conditional teacher takes (x, sigma, labels); every convention above then sees the
        teacher for those labels, so the methods need no label plumbing of their own.
        """
        if labels is None:
            return self
        base = self.denoise
        return ConvertedTeacher(lambda x, sigma: base(x, sigma, labels), self.sigma_d, self.name)


# ---------------------------------------------------------------------------------------------------
# Parameterizations: coefficients of f(x, sigma) = c_skip x + c_out F(c_in x, c_noise).


def edm_precond(sigma: torch.Tensor, sigma_d: float = SIGMA_DATA):
    """EDM (Karras et al. 2022, Table 1): returns c_skip, c_out, c_in, c_noise."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_d**2 / (sigma**2 + sigma_d**2)
    c_out = sigma * sigma_d / torch.sqrt(sigma**2 + sigma_d**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_d**2)
    c_noise = torch.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def cm_boundary_precond(sigma: torch.Tensor, sigma_d: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                        noise_scale: float = 250.0):
    """CM (Song et al. 2023, App. C): c_skip(sigma_min) = 1 and c_out(sigma_min) = 0, so f(x, sigma_min) = x.

    c_noise = 250 ln(sigma) as in openai/consistency_models (`noise_scale` = 1/4 gives EDM's ln(sigma)/4).
    """
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_d**2 / ((sigma - sigma_min) ** 2 + sigma_d**2)
    c_out = (sigma - sigma_min) * sigma_d / torch.sqrt(sigma**2 + sigma_d**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_d**2)
    c_noise = noise_scale * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise

"""Parameterizations around the shared backbone, one per time convention (docs/methods.md, "Conventions").

Each wrapper turns the raw network output F into the quantity its methods need.  All of them feed the
backbone the same inputs as EDM's preconditioning (c_in x, ln(sigma)/4), so a student that starts from the
EDM teacher's weights starts as the teacher, in whatever convention it trains (the sCM and FACM papers start
from their own TrigFlow / flow-matching teachers; re-expressing the EDM teacher is FastGen's route).
"""

from __future__ import annotations

import torch

from .conventions import (
    SIGMA_DATA,
    SIGMA_MIN,
    append_dims,
    cm_boundary_precond,
    coefficient_dtype,
    edm_precond,
    time_vector,
)


def _sigma_vector(v, x: torch.Tensor) -> torch.Tensor:
    return time_vector(v, x, coefficient_dtype(x))


class EDMDenoiser(torch.nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise): EDM's preconditioning (Karras et al. 2022, Table 1)."""

    def __init__(self, backbone: torch.nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma, labels=None, s=None) -> torch.Tensor:
        sigma = _sigma_vector(sigma, x)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in edm_precond(sigma, self.sigma_data))
        kw = {} if s is None else {"s": edm_precond(_sigma_vector(s, x), self.sigma_data)[3]}
        F = self.backbone((c_in * x).to(x.dtype), c_noise.flatten(), labels=labels, **kw)
        return (c_skip * x + c_out * F.to(torch.float32)).to(x.dtype)


class CMDenoiser(torch.nn.Module):
    """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with CM's boundary coefficients: f(x, sigma_min) = x.

    c_noise = noise_scale * ln(sigma): 0.25 (EDM's, the default, so teacher-initialized students start near the
    teacher) or 250 (openai/consistency_models, for networks trained from scratch).
    `edm_in_training`: ECT's ECMPrecond switch, EDM's coefficients (boundary at sigma = 0) while `self.training`.
    """

    def __init__(self, backbone: torch.nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 noise_scale: float = 0.25, edm_in_training: bool = False):
        super().__init__()
        self.backbone = backbone
        self.sigma_data, self.sigma_min, self.noise_scale = sigma_data, sigma_min, noise_scale
        self.edm_in_training = edm_in_training

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        sigma = _sigma_vector(sigma, x)
        boundary = 0.0 if (self.training and self.edm_in_training) else self.sigma_min
        coeffs = cm_boundary_precond(sigma, self.sigma_data, boundary, self.noise_scale)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in coeffs)
        F = self.backbone((c_in * x).to(x.dtype), c_noise.flatten(), labels=labels)
        return (c_skip * x + c_out * F.to(torch.float32)).to(x.dtype)


class TrigFlowModel(torch.nn.Module):
    """F_theta(x_t / sigma_d, t) of sCM (Lu & Song 2024): dx_t/dt = sigma_d F, f(x_t, t) = cos t x_t - sin t sigma_d F.

    time_input "edm" (default): the backbone sees (x_t / sigma_d, ln(sigma_d tan t) / 4) and F = -F_backbone.
    With sigma = sigma_d tan t and x_sigma = x_t / cos t, EDM's c_in x_sigma = x_t / sigma_d, c_skip x_sigma =
    cos t x_t and c_out = sigma_d sin t, so D = cos t x_t + sigma_d sin t F_edm = cos t x_t - sigma_d sin t F:
    an EDM-trained backbone *is* the TrigFlow teacher, exactly.  time_input "identity": the paper's
    c_noise(t) = t and F = F_backbone, for a backbone trained in TrigFlow from the start.
    """

    def __init__(self, backbone: torch.nn.Module, sigma_data: float = SIGMA_DATA, time_input: str = "edm"):
        super().__init__()
        if time_input not in ("edm", "identity"):
            raise ValueError(f"time_input must be 'edm' or 'identity', got {time_input!r}")
        self.backbone = backbone
        self.sigma_data, self.time_input = sigma_data, time_input

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        if self.time_input == "identity":
            return t
        return torch.log(self.sigma_data * torch.tan(t)) / 4

    def forward(self, x_t: torch.Tensor, t, labels=None, return_logvar: bool = False):
        t = _sigma_vector(t, x_t)
        out = self.backbone(x_t / self.sigma_data, self.c_noise(t), labels=labels, return_logvar=return_logvar)
        F, logvar = out if return_logvar else (out, None)
        F = -F if self.time_input == "edm" else F
        return (F, logvar) if return_logvar else F

    def consistency(self, x_t: torch.Tensor, t, labels=None) -> torch.Tensor:
        """f(x_t, t) = cos t x_t - sin t sigma_d F: the one-step jump to data (sCM eq. 6)."""
        t = _sigma_vector(t, x_t)
        tt = append_dims(t, x_t.ndim)
        f = torch.cos(tt) * x_t - torch.sin(tt) * self.sigma_data * self(x_t, t, labels)
        return torch.where(tt == 0, x_t, f)  # the boundary f(x, 0) = x, also where the "edm" time input is ln 0

"""FACM: Flow-Anchored Consistency Models (Peng et al. 2025, arXiv:2507.03738).

Rectified flow with data at t = 1.  One network F(x_t, t, r) gives the velocity averaged from t to the end time r:
r = t is the instantaneous velocity (the flow-matching anchor), r = 1 the average velocity to the data end (the
consistency model).  loss = L_CM + L_FM, with the consistency target F_sg - (1 - t^p) clamp(F_sg - v_bar, -1, 1),
v_bar = v + (1 - t) dF/dt from a JVP.  Equations, the parameterization's derivation and departures from
ali-vilab/FACM: docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from core.conventions import (
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    append_dims,
    coefficient_dtype,
    require_noise_range,
    time_vector,
)
from core.errors import require
from core.jvp import SharedRandomness
from core.jvp import jvp as directional_derivative
from core.samplers import intermediate_levels

from .base import Method, Randn
from .registry import register


class FACMVelocity(torch.nn.Module):
    """F(x_t, t, r): rectified-flow velocity averaged from t to r, on an EDM-preconditioned backbone.

    F = (sigma_d^2 t - (1 - t)) / R^2 x_t + (sigma_d / R) B(x_t / R, c_noise(t), s=r), R^2 = (1 - t)^2 + sigma_d^2 t^2,
    c_noise(t) = ln(clamp((1 - t)/t, sigma_min, sigma_max)) / 4 (derived in docs/methods.md): nothing is divided by
    a small number anywhere in [0, 1], and with the teacher's weights and the zero-initialized s-branch
    F(x_t, t, r) = teacher.velocity_rf(x_t, t) for every r.
    """

    def __init__(self, backbone: torch.nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX):
        super().__init__()
        self.backbone = backbone
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        """ln(sigma) / 4 at sigma = (1 - t)/t clamped to [sigma_min, sigma_max] (clamping t keeps logs finite)."""
        t = t.clamp(1.0 / (1.0 + self.sigma_max), 1.0 / (1.0 + self.sigma_min))
        return (torch.log1p(-t) - torch.log(t)) / 4

    def forward(self, x_t: torch.Tensor, t, r=1.0, labels=None) -> torch.Tensor:
        dtype = coefficient_dtype(x_t)
        t, r = time_vector(t, x_t, dtype), time_vector(r, x_t, dtype)
        tt = append_dims(t, x_t.ndim)
        sd2 = self.sigma_data**2
        R2 = (1 - tt) ** 2 + sd2 * tt**2
        R = R2.sqrt()
        c_skip = (sd2 * tt - (1 - tt)) / R2
        B = self.backbone((x_t / R).to(x_t.dtype), self.c_noise(t), s=r, labels=labels)
        return (c_skip * x_t + self.sigma_data / R * B.to(dtype)).to(x_t.dtype)


@register
@dataclass(frozen=True)
class FACM(Method):
    """FACM (Peng et al. 2025): consistency to the data end anchored by flow matching; defaults from the official
    `scripts/train.sh` (`--distill --p 0.5 --mean 0.8 --std 1.6`, FACMLoss defaults p = 0.5, c = 1e-3)."""

    name = "facm"
    default_init: ClassVar[str] = "teacher"  # the paper starts from its flow-matching teacher
    needs_second_time_input: ClassVar[bool] = True  # r: r = t flow matching, r = 1 consistency
    start_sigma: ClassVar[float] = SIGMA_MAX  # the ground truth's start; sampling starts at sigma = inf (docs)

    distill: bool = True  # v from the teacher (the paper's runs: --distill), else v = x0 - eps
    P_mean: float = -0.8  # FACM passes --mean 0.8 and uses P_mean = -mean
    P_std: float = 1.6
    p: float = 0.5  # relaxation alpha(t) = 1 - t^p
    clamp: float = 1.0  # g is clamped to [-clamp, clamp]
    norm_p: float = 0.5  # L_CM = beta e / sg(e + norm_c)^norm_p
    norm_c: float = 1e-3
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN  # EDM-sigma range of the backbone's time input
    sigma_max: float = SIGMA_MAX
    jvp: Literal["autograd", "functorch", "finite_difference"] = "autograd"
    jvp_eps: float = 1e-3  # step of the finite-difference fallback (in units of the tangent)
    mid_times: list[float] = field(default_factory=lambda: [0.5])  # rf times after t = 0 (paper: 0.5 for 2 steps)

    def __post_init__(self):
        require(self.P_std > 0, "P_std", "must be > 0")
        require(self.p > 0, "p", "must be > 0")
        require(self.norm_p >= 0, "norm_p", "must be >= 0")
        require(self.jvp_eps > 0, "jvp_eps", "must be > 0")
        require(self.clamp > 0, "clamp", "must be > 0")
        require(self.norm_c > 0, "norm_c", "must be > 0")
        require_noise_range(self.sigma_min, self.sigma_max, self.sigma_data)
        require(all(0.0 < t < 1.0 for t in self.mid_times), "mid_times", "must lie in (0, 1)")
        require(all(a < b for a, b in zip(self.mid_times[:-1], self.mid_times[1:], strict=True)), "mid_times",
                "must ascend (rf time runs from noise at 0 to data at 1)")

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]  # distillation is a field here
        return self.distill

    def build_model(self, backbone):
        return FACMVelocity(backbone, self.sigma_data, self.sigma_min, self.sigma_max)

    # -- training -------------------------------------------------------------------------------------------

    def sample_t(self, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """t = 1 - (2/pi) arctan(sigma), sigma = exp(N(P_mean, P_std^2)) (FACM `sample_t`, type 'default')."""
        sigma = (torch.randn(n, device=device, dtype=dtype) * self.P_std + self.P_mean).exp()
        return 1 - torch.atan(sigma) * (2 / math.pi)

    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        """Draws t (sample_t) then eps = randn_like(x0); no curriculum, so `progress` is unused."""
        t = self.sample_t(x0.shape[0], device=x0.device).to(torch.promote_types(x0.dtype, torch.float32))
        eps = torch.randn_like(x0)
        tt = append_dims(t, x0.ndim)
        x_t = (tt * x0 + (1 - tt) * eps).to(x0.dtype)
        if self.distill:
            if teacher is None:
                raise ValueError("facm with distill=True needs a teacher (set params.distill: false for v = x0 - eps)")
            with torch.no_grad():
                v = teacher.velocity_rf(x_t, t).to(x0.dtype)
        else:
            v = x0 - eps
        terms = self.loss_at(model, x_t, t, v, labels)
        return {k: val.mean() for k, val in terms.items()}

    def loss_at(self, model, x_t, t, v, labels=None) -> dict[str, torch.Tensor]:
        """Per-sample FACM terms at given (x_t, t, v): {"loss", "loss_cm", "loss_fm", "mse_cm"}."""
        rng = SharedRandomness(x_t.device)  # one dropout mask for the anchor, the JVP and the CM forward
        ones = torch.ones_like(t)
        with rng.replay():
            F_fm = model(x_t, t, t, labels)  # instantaneous velocity, r = t
        loss_fm = flow_matching_loss(F_fm, v)

        def F_avg(x, time):
            with rng.replay():
                return model(x, time, ones, labels)  # average velocity to the data end, r = 1

        with rng.replay():
            F_cm = model(x_t, t, ones, labels)
        # F_cm is the primal: the finite-difference path then makes two calls instead of three
        F_sg, dF_dt = directional_derivative(F_avg, (x_t, t), (v, ones), method=self.jvp, eps=self.jvp_eps,
                                             primal_out=F_cm)

        dtype = torch.promote_types(x_t.dtype, torch.float32)
        F_cm, F_sg, dF_dt, v = F_cm.to(dtype), F_sg.to(dtype), dF_dt.to(dtype), v.to(dtype)
        tt = append_dims(t.to(dtype), x_t.ndim)
        v_bar = v + (1 - tt) * dF_dt
        g = F_sg - v_bar
        target = F_sg - (1 - tt**self.p) * g.clamp(-self.clamp, self.clamp)
        e = ((F_cm - target) ** 2).flatten(1).mean(1)
        beta = torch.cos(t.to(dtype) * math.pi / 2)
        loss_cm = beta * e / (e + self.norm_c).detach() ** self.norm_p
        return {"loss": loss_cm + loss_fm, "loss_cm": loss_cm.detach(), "loss_fm": loss_fm.detach(),
                "mse_cm": e.detach()}

    # -- sampling -------------------------------------------------------------------------------------------

    def sample_times(self, steps: int) -> list[float]:
        """[0, then steps - 1 re-noising times], ascending: `mid_times[:steps - 1]` when the list is long enough,
        else FACM's uniform grid i / steps, i = 1..steps - 1 (which also gives 0.5 for 2 steps)."""
        mids = intermediate_levels(steps, self.mid_times, lambda n: [i / n for i in range(1, n)])
        return [0.0, *mids]

    @torch.no_grad()
    def sample(self, model, z, steps, *, randn: Randn, labels=None):
        """x = z at t = 0; x_end = x + (1 - t) F(x, t, 1); re-noise x = t' x_end + (1 - t') eps' for each next t'."""
        times = self.sample_times(steps)
        x = z
        for i, t in enumerate(times):
            x_end = x + (1 - t) * model(x, t, 1.0, labels)
            if i + 1 < len(times):
                t_next = times[i + 1]
                x = t_next * x_end + (1 - t_next) * randn(x_end)
        return x_end


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: mean_D((pred - target)^2) + mean(1 - cos_sim(pred, target)), the cosine along dim 1 (channels
    of an image, the coordinates of a point) and averaged over the rest (FACM `flow_matching_loss`)."""
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    cos = F.cosine_similarity(pred, target, dim=1)
    return mse + (1 - cos).reshape(cos.shape[0], -1).mean(1)

"""ECT: Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy", arXiv:2406.14548).

Consistency training started from a pretrained diffusion model: t ~ LogNormal, r = r(t) shrinks towards t stage
by stage, loss = w(t, r) [sqrt(||f(x_t, t) - sg f(x_r, r)||^2 + c^2) - c] with sg f(x_r, 0) := x0 and
theta- = sg(theta); w = 1/(t - r) (CIFAR-10, locuslab/ect main) or (t^2 + sigma_d^2)/(t sigma_d)^2 (ImageNet-64,
imgnet branch).  Early stages clamp most r to 0, so tuning starts as diffusion training.  CM's parameterization
(or ECT's EDM-coefficient variants, `precond`) and sampler.  Equations and departures: docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from core.conventions import append_dims
from core.errors import require
from core.jvp import SharedRandomness
from core.losses import pseudo_huber
from core.precond import CMDenoiser
from core.schedules import lognormal_sigma

from .cm import ConsistencyModel, noised_pair
from .registry import register


def ect_stage(progress: float, stages: int) -> int:
    """floor(progress * stages), kept in 0..stages - 1 (progress = 1 is the last stage's end)."""
    return min(max(int(math.floor(progress * stages)), 0), stages - 1)


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's sigmoid mapping r(t) = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clamped at 0 (k = 0: constant ratio)."""
    decay = float(q) ** -(stage + 1)
    return (t * (1 - decay * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)


@register
@dataclass(frozen=True)
class ECT(ConsistencyModel):
    """Defaults are the CIFAR-10 recipe (locuslab/ect main, run_ecm.sh: q = 2, k = 8, b = 1, c = 0, 8 stages,
    weight 1/(t - r)).  The ImageNet-64 recipe (imgnet branch, run_imgnet_ecm.sh with preset edm2-img64-s) is
    P_mean -0.8, P_std 1.6, q = 4 over 4 stages, c = 0.06, weighting snrpk, precond edm.  Optimizer, batch and
    dropout belong to the run config."""

    name = "ect"
    default_init = "teacher"

    P_mean: float = -1.1  # ImageNet-64: -0.8 (the edm2-img64-* presets override --mean)
    P_std: float = 2.0  # ImageNet-64: 1.6
    q: float = 2.0  # dt shrinks by q per stage; 4 on ImageNet-64; 256 with --double 10000 in run_ecm_1hour.sh
    k: float = 8.0
    b: float = 1.0
    stages: int = 8  # CIFAR-10: 200k iterations, dt halves every 25k; ImageNet-64: 4 (2000 ticks, --double 500)
    huber_c: float = 0.0  # 0.06 on ImageNet-64 (absolute, on the per-sample norm)
    weighting: Literal["inv_dt", "snrpk"] = "inv_dt"  # 1/(t - r) (CIFAR) | (t^2 + sigma_d^2)/(t sigma_d)^2 (ImageNet)
    # cm: CM's boundary coefficients always, f(x, sigma_min) = x | ecm: ECMPrecond (main): EDM's coefficients while
    # training, the boundary ones at evaluation | edm: EDM2's Precond (imgnet): EDM's coefficients always
    precond: Literal["cm", "ecm", "edm"] = "cm"

    def __post_init__(self):
        super().__post_init__()
        require(math.isfinite(self.P_mean), "P_mean", "must be a finite number")
        require(self.P_std > 0, "P_std", "must be > 0")
        require(self.q > 1, "q", "must be > 1 (dt shrinks by a factor q per stage)")
        require(self.k >= 0, "k", "must be >= 0")
        require(self.b > 0, "b", "must be > 0")
        require(self.stages >= 1, "stages", "must be >= 1")
        require(self.huber_c >= 0, "huber_c", "must be >= 0")
        require(self.weighting in ("inv_dt", "snrpk"), "weighting", "must be inv_dt or snrpk")
        require(self.precond in ("cm", "ecm", "edm"), "precond", "must be cm, ecm or edm")

    def build_model(self, backbone):
        if self.precond == "edm":  # boundary at sigma = 0: exactly EDM's c_skip, c_out (c_noise = noise_scale ln sigma)
            return CMDenoiser(backbone, self.sigma_data, 0.0, self.noise_scale)
        return CMDenoiser(backbone, self.sigma_data, self.sigma_min, self.noise_scale,
                          edm_in_training=self.precond == "ecm")

    def stage(self, progress: float) -> int:
        return ect_stage(progress, self.stages)

    def r_of_t(self, t: torch.Tensor, progress: float) -> torch.Tensor:
        return ect_r(t, self.stage(progress), self.q, self.k, self.b)

    def weight(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.weighting == "snrpk":
            return (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        return 1.0 / (t - r)

    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        t = lognormal_sigma(x0.shape[0], self.P_mean, self.P_std, device=x0.device)
        r = self.r_of_t(t, progress)
        x_t, x_r = noised_pair(x0, t, r)
        rng = SharedRandomness(x0.device)  # the same dropout mask for both calls
        with rng.replay():
            pred = model(x_t, t, labels)
        has_r = r > 0
        if bool(has_r.any()):
            with rng.replay(), torch.no_grad():
                # rows with r = 0 are evaluated at sigma_min (ln 0 is not finite) and then replaced by x0
                f_r = model(x_r, torch.where(has_r, r, torch.full_like(r, self.sigma_min)), labels)
            target_x = torch.where(append_dims(has_r, x0.ndim), f_r, x0)
        else:
            target_x = x0
        dist = pseudo_huber(pred, target_x.detach(), self.huber_c)
        w = self.weight(t, r)
        return {"loss": (w * dist).mean(), "distance": dist.mean().detach(),
                "stage": torch.tensor(float(self.stage(progress))), "frac_r_zero": (~has_r).float().mean()}

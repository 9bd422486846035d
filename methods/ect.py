"""ECT: Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy", arXiv:2406.14548).

Consistency training started from a pretrained diffusion model: t ~ LogNormal, r = r(t) shrinks towards t stage
by stage, loss = [sqrt(||f(x_t, t) - sg f(x_r, r)||^2 + c^2) - c] / (t - r) with sg f(x_r, 0) := x0 and
theta- = sg(theta).  Early stages clamp most r to 0, so tuning starts as diffusion training.  CM's
parameterization and sampler.  Equations and departures from locuslab/ect: docs/methods.md.
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
    """Defaults are the CIFAR-10 recipe (run_ecm.sh: q = 2, k = 8, b = 1, c = 0, 8 stages); the optimizer
    settings (RAdam 1e-4, batch 128, dropout 0.2) belong to the run config."""

    name = "ect"
    default_init = "teacher"

    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 2.0  # 4 on ImageNet-64 (imgnet branch); 256 with --double 10000 in run_ecm_1hour.sh
    k: float = 8.0
    b: float = 1.0
    stages: int = 8  # CIFAR-10: 200k iterations, dt halves every 25k
    huber_c: float = 0.0  # 0.06 on ImageNet-64 (absolute, on the per-sample norm)
    weighting: Literal["inv_dt", "snrpk"] = "inv_dt"  # 1/(t - r) (CIFAR) | (t^2 + sigma_d^2)/(t sigma_d)^2 (ImageNet)
    edm_precond_in_training: bool = False  # True: ECMPrecond's EDM coefficients while training

    def __post_init__(self):
        super().__post_init__()
        require(self.P_std > 0, "P_std", "must be > 0")
        require(self.q > 1, "q", "must be > 1 (dt shrinks by a factor q per stage)")
        require(self.k >= 0, "k", "must be >= 0")
        require(self.b > 0, "b", "must be > 0")
        require(self.stages >= 1, "stages", "must be >= 1")
        require(self.huber_c >= 0, "huber_c", "must be >= 0")

    def build_model(self, backbone):
        return CMDenoiser(backbone, self.sigma_data, self.sigma_min, self.noise_scale, self.edm_precond_in_training)

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

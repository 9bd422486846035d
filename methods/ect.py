"""ECT: Easy Consistency Tuning (Geng et al., "Consistency Models Made Easy", arXiv:2406.14548, ICLR 2025).

Consistency training started from a pretrained diffusion model, in EDM sigma (METHODS.md section 4):

    t ~ LogNormal(P_mean, P_std),   r = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))),
    x_t = x0 + t eps,  x_r = x0 + r eps (the same eps),
    loss = [sqrt(||f(x_t, t) - sg f(x_r, r)||_2^2 + c^2) - c] / (t - r),   sg f(x_r, 0) := x0,

with theta- = sg(theta) (no EMA target) and the same dropout mask for both calls.  Early stages clamp most r to
0, so tuning starts as diffusion training (target x0) and dt = t - r halves every stage (q = 2).

Read against locuslab/ect `training/loss.py` (ECMLoss), `training/networks.py` (ECMPrecond) and
`training/ct_training_loop.py`:
- the exponent is q^-(stage+1), stage 0 first, as in the code (`decay = 1 / q ** (stage + 1)`);
- the stage is `cur_tick // double_ticks`; run_ecm.sh (CIFAR-10) trains 25.6 Mimg in ticks of 12.8 kimg with
  `--double 250`: 2000 ticks, 8 stages of 25k iterations.  Here stage = floor(progress * stages), a pure function
  of progress, with `stages` = 8 by default;
- the distance is the per-sample L2 norm over all D dimensions (a sum, not a mean); c is not scaled with D
  (the ImageNet-64 c = 0.06 equals iCT's 0.00054 sqrt(D) at D = 64*64*3);
- the weight is exactly 1/(t - r) on CIFAR-10 (main branch); the imgnet branch weights by
  (t^2 + sigma_d^2) / (t sigma_d)^2 instead (`weighting: snrpk`);
- ECMPrecond uses EDM's c_skip, c_out (no sigma_min shift) while training and CM's boundary version at
  evaluation.  METHODS.md asks for the boundary condition always (the default here); `edm_precond_in_training`
  reproduces the code's switch.  The code also replaces non-finite targets by 0 (`nan_to_num`); we do not (the
  loop counts non-finite losses instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from common.conventions import SIGMA_DATA, SIGMA_MIN, append_dims, cm_boundary_precond
from common.jvp import SharedRandomness
from common.precond import CMDenoiser
from common.samplers import consistency_multistep, multistep_sigmas
from common.schedules import lognormal_sigma

from .base import Method, Randn
from .registry import register


def ect_stage(progress: float, stages: int) -> int:
    """floor(progress * stages), kept in 0..stages - 1 (progress = 1 is the last stage's end)."""
    return min(max(int(math.floor(progress * stages)), 0), stages - 1)


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's sigmoid mapping r(t) = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))), clamped at 0 (k = 0: constant ratio)."""
    decay = float(q) ** -(stage + 1)
    return (t * (1 - decay * (1 + k * torch.sigmoid(-b * t)))).clamp(min=0)


class ECMDenoiser(CMDenoiser):
    """CMDenoiser with ECT's optional switch: EDM's c_skip, c_out (boundary at sigma = 0, i.e. sigma_min = 0) while
    `self.training`, CM's boundary version (f(x, sigma_min) = x) in eval mode.  Off by default (METHODS.md)."""

    def __init__(self, backbone: torch.nn.Module, sigma_data: float = SIGMA_DATA, sigma_min: float = SIGMA_MIN,
                 noise_scale: float = 0.25, edm_in_training: bool = False):
        super().__init__(backbone, sigma_data, sigma_min, noise_scale)
        self.edm_in_training = edm_in_training

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        if not (self.training and self.edm_in_training):
            return super().forward(x, sigma, labels)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        coeffs = cm_boundary_precond(sigma, self.sigma_data, 0.0, self.noise_scale)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in coeffs)
        F = self.backbone((c_in * x).to(x.dtype), c_noise.flatten(), labels=labels)
        return (c_skip * x + c_out * F.to(torch.float32)).to(x.dtype)


@register
@dataclass(frozen=True)
class ECT(Method):
    """Easy Consistency Tuning; defaults are the CIFAR-10 recipe (run_ecm.sh: q = 2, k = 8, b = 1, c = 0, 8 stages;
    the paper's optimizer settings, RAdam 1e-4, batch 128, dropout 0.2, belong to the run config)."""

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
    edm_precond_in_training: bool = False  # True: ECMPrecond's train/eval switch (see the module docstring)
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    noise_scale: float = 0.25  # c_noise = ln(sigma)/4, EDM's: a teacher-initialized student starts as the teacher
    mid_sigmas: list[float] = field(default_factory=lambda: [0.821])  # ECT's 2-step mid_t on CIFAR-10

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.q <= 1:
            raise ValueError(f"q must be > 1 (dt shrinks by q per stage), got {self.q}")

    def build_model(self, backbone):
        return ECMDenoiser(backbone, self.sigma_data, self.sigma_min, self.noise_scale, self.edm_precond_in_training)

    def stage(self, progress: float) -> int:
        return ect_stage(progress, self.stages)

    def r_of_t(self, t: torch.Tensor, progress: float) -> torch.Tensor:
        return ect_r(t, self.stage(progress), self.q, self.k, self.b)

    def weight(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.weighting == "snrpk":
            return (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        return 1.0 / (t - r)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample sqrt(||a - b||_2^2 + c^2) - c over all dimensions (plain L2 norm when c = 0)."""
        sq = ((a - b) ** 2).flatten(1).sum(1)
        c = self.huber_c
        return torch.sqrt(sq + c**2) - c if c > 0 else torch.sqrt(sq)

    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        t = lognormal_sigma(x0.shape[0], self.P_mean, self.P_std, device=x0.device)
        r = self.r_of_t(t, progress)
        eps = torch.randn_like(x0)
        x_t = x0 + append_dims(t, x0.ndim) * eps
        x_r = x0 + append_dims(r, x0.ndim) * eps
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
        dist = self.distance(pred, target_x.detach())
        w = self.weight(t, r)
        return {"loss": (w * dist).mean(), "distance": dist.mean().detach(),
                "stage": torch.tensor(float(self.stage(progress))), "frac_r_zero": (~has_r).float().mean()}

    def sample(self, model, z, steps, *, randn: Randn, labels=None):
        """CM's multistep sampler (Song et al. 2023, Alg. 1): sigma_max, then `mid_sigmas` (ECT's generator_fn adds
        noise t_next eps instead of sqrt(t_next^2 - sigma_min^2) eps: 0.821 vs 0.8209976, immaterial)."""
        sigmas = multistep_sigmas(steps, list(self.mid_sigmas), self.sigma_max, self.sigma_min)
        return consistency_multistep(lambda x, s: model(x, s, labels), z, sigmas, randn, self.sigma_min)

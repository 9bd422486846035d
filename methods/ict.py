"""iCT: improved Consistency Training (Song & Dhariwal 2023, arXiv:2310.14189).

CM's consistency training from random weights with the paper's changes: theta- = sg(theta) (no EMA target),
the pseudo-Huber distance, lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i), the pair index drawn from a discretized
lognormal, and the exponential curriculum N(k).  The network changes (Fourier embedding scale 0.02, dropout 0.3)
are backbone settings in the config.  Equations and departures: docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.errors import require
from core.jvp import SharedRandomness
from core.losses import pseudo_huber
from core.schedules import karras_sigmas

from .cm import ConsistencyModel, noised_pair
from .registry import register


def ict_num_scales(progress: float, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = K / (log2 floor(s1/s0) + 1), as a function of progress = k/K.

    Written in progress, K' is not floored to whole iterations (stage j starts less than j iterations later; no
    change when K is a multiple of the stage count).  The 1e-9 absorbs the rounding of step / iterations.
    """
    stages = math.log2(s1 // s0) + 1  # 8 for the paper's s0 = 10, s1 = 1280
    k_over_kprime = math.floor(max(progress, 0.0) * stages + 1e-9)
    return min(s0 * 2**k_over_kprime, s1) + 1


def lognormal_index_probs(sigmas_ascending: torch.Tensor, P_mean: float, P_std: float) -> torch.Tensor:
    """p(i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt2 P_std)),
    i = 0..N-2 on an ascending grid: the lognormal mass of each interval [sigma_i, sigma_{i+1}], renormalized."""
    cdf = torch.erf((sigmas_ascending.log() - P_mean) / (math.sqrt(2.0) * P_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


@register
@dataclass(frozen=True)
class ICT(ConsistencyModel):
    """loss = lambda(sigma_i) d(f_theta(x0 + sigma_{i+1} eps, sigma_{i+1}), sg f_theta(x0 + sigma_i eps, sigma_i)) on
    adjacent levels sigma_i < sigma_{i+1} of the Karras grid of N(k).  huber_c None means 0.00054 sqrt(D)."""

    name = "ict"
    default_init = "random"
    P_mean: float = -1.1
    P_std: float = 2.0
    s0: int = 10
    s1: int = 1280
    huber_c: float | None = None

    def __post_init__(self):
        super().__post_init__()
        require(self.P_std > 0, "P_std", "must be > 0")
        require(self.s0 >= 1, "s0", "must be >= 1")
        require(self.s1 >= self.s0, "s1", "must be >= s0")
        require(self.huber_c is None or self.huber_c >= 0, "huber_c", "must be >= 0 (or null for 0.00054 sqrt(D))")

    def num_scales(self, progress: float) -> int:
        return ict_num_scales(progress, self.s0, self.s1)

    def grid(self, progress: float, device=None) -> torch.Tensor:
        """The Karras grid of N(progress) levels, ascending (sigma_min first), float64."""
        return karras_sigmas(self.num_scales(progress), self.sigma_min, self.sigma_max, self.rho,
                             device=device).flip(0)

    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        sigmas = self.grid(progress, x0.device)
        probs = lognormal_index_probs(sigmas, self.P_mean, self.P_std)
        i = torch.multinomial(probs, x0.shape[0], replacement=True)
        r, t = sigmas[i], sigmas[i + 1]  # r < t, adjacent
        weight = 1.0 / (t - r)  # the paper's 1/(sigma_{i+1} - sigma_i) on the ascending grid: positive
        r, t, weight = (v.to(torch.float32) for v in (r, t, weight))
        x_t, x_r = noised_pair(x0, t, r)
        rng = SharedRandomness(x0.device)  # the same dropout mask for both calls
        with rng.replay():
            pred = model(x_t, t, labels)
        with torch.no_grad(), rng.replay():  # theta- = sg(theta): no EMA teacher
            tgt = model(x_r, r, labels)
        dist = pseudo_huber(pred, tgt, self.huber_c)
        return {"loss": (weight * dist).mean(), "distance": dist.mean(),
                "num_scales": torch.tensor(float(len(sigmas))), "weight_mean": weight.mean()}

"""iCT: improved Consistency Training (Song & Dhariwal 2023, "Improved Techniques for Training Consistency
Models", arXiv:2310.14189; METHODS.md section 3).

CM's consistency training (Song et al. 2023) from random weights, with the paper's changes:
- no EMA teacher: theta- = sg(theta), the same network under no_grad with the same dropout mask;
- pseudo-Huber distance d(x, y) = sqrt(||x - y||_2^2 + c^2) - c on the per-sample L2 norm, c = 0.00054 sqrt(D);
- weight lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i) in absolute value (the paper's grid is ascending);
- the pair index drawn from a lognormal discretized on the grid (P_mean = -1.1, P_std = 2.0);
- the exponential curriculum N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)).
The network changes of the paper (Fourier embedding scale 0.02, dropout 0.3 on CIFAR-10) are backbone settings
(`methods.ict.network` in the config), not fields here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from common.conventions import append_dims
from common.jvp import SharedRandomness
from common.precond import CMDenoiser
from common.samplers import consistency_multistep, multistep_sigmas
from common.schedules import karras_sigmas

from .base import Method, Randn
from .registry import register


def ict_num_scales(progress: float, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = K / (log2 floor(s1/s0) + 1), as a function of progress = k/K.

    The paper floors K' to whole iterations; written in progress we drop that floor, i.e. stage j starts at
    k = j K / (log2 floor(s1/s0) + 1) instead of j floor(K / (...)), which moves the start of stage j later by
    less than j iterations (j <= 8 for the paper's s0, s1; no change when K is a multiple of 8, as 400k is).
    The 1e-9 absorbs the rounding of progress = step / iterations at a stage boundary.
    """
    stages = math.log2(s1 // s0) + 1  # 8 for the paper's s0 = 10, s1 = 1280
    k_over_kprime = math.floor(max(progress, 0.0) * stages + 1e-9)
    return min(s0 * 2**k_over_kprime, s1) + 1


def lognormal_index_probs(sigmas_ascending: torch.Tensor, P_mean: float, P_std: float) -> torch.Tensor:
    """p(i) proportional to erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt2 P_std)),
    i = 0..N-2 on an ascending grid: the lognormal mass of each interval [sigma_i, sigma_{i+1}], renormalized.

    On the Karras grid the interval widths grow like sigma^(1 - 1/rho), so the mode of p sits near
    ln sigma = P_mean - P_std^2 / rho (-1.67 for the paper's values), below P_mean."""
    cdf = torch.erf((sigmas_ascending.log() - P_mean) / (math.sqrt(2.0) * P_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||x - y||_2^2 + c^2) - c per sample (the norm over all of a sample's dimensions, not elementwise)."""
    return torch.sqrt((x - y).flatten(1).square().sum(1) + c**2) - c


@register
@dataclass(frozen=True)
class ICT(Method):
    """Improved consistency training: loss lambda(sigma_i) d(f_theta(x0 + sigma_{i+1} eps, sigma_{i+1}),
    sg f_theta(x0 + sigma_i eps, sigma_i)) on adjacent levels sigma_i < sigma_{i+1} of the Karras grid of N(k).

    noise_scale: c_noise = noise_scale ln(sigma).  Default 0.25 (EDM's, what the shared backbone's positional
    embedding is sized for); openai/consistency_models uses 250 (with its own embedding), so 250 is the
    official value to try where the backbone is configured for it.  huber_c None means 0.00054 sqrt(D).

    Paper training settings (train config, not fields): CIFAR-10 batch 1024, 400k iterations, RAdam lr 1e-4.
    The weight's largest value grows from 68 (N = 11) to 25585 (N = 1281), and the gradient norm with it
    (sg target: the gradient is lambda times a unit-direction term); Adam normalizes the scale, and on the 2-D
    mixture Adam/RAdam at lr 1e-3 and 3e-4 stayed finite and stable over 8k iterations.
    """

    name = "ict"
    default_init = "random"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    noise_scale: float = 0.25
    P_mean: float = -1.1
    P_std: float = 2.0
    s0: int = 10
    s1: int = 1280
    huber_c: float | None = None
    mid_sigmas: list[float] = field(default_factory=lambda: [0.821])  # the paper's 2-step level on CIFAR-10

    def build_model(self, backbone):
        return CMDenoiser(backbone, self.sigma_data, self.sigma_min, self.noise_scale)

    def num_scales(self, progress: float) -> int:
        return ict_num_scales(progress, self.s0, self.s1)

    def grid(self, progress: float, device=None) -> torch.Tensor:
        """The Karras grid of N(progress) levels, ascending (sigma_min first), float64."""
        return karras_sigmas(self.num_scales(progress), self.sigma_min, self.sigma_max, self.rho,
                             device=device).flip(0)

    def huber_constant(self, x0: torch.Tensor) -> float:
        return self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x0[0].numel())

    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        sigmas = self.grid(progress, x0.device)
        probs = lognormal_index_probs(sigmas, self.P_mean, self.P_std)
        i = torch.multinomial(probs, x0.shape[0], replacement=True)
        r, t = sigmas[i], sigmas[i + 1]  # r < t, adjacent
        weight = 1.0 / (t - r)  # the paper's 1/(sigma_{i+1} - sigma_i) on the ascending grid: positive
        r, t, weight = (v.to(torch.float32) for v in (r, t, weight))
        eps = torch.randn_like(x0)
        x_t = x0 + append_dims(t, x0.ndim) * eps
        x_r = x0 + append_dims(r, x0.ndim) * eps
        rng = SharedRandomness(x0.device)  # the same dropout mask for both calls
        with rng.replay():
            pred = model(x_t, t, labels)
        with torch.no_grad(), rng.replay():  # theta- = sg(theta): no EMA teacher
            tgt = model(x_r, r, labels)
        dist = pseudo_huber(pred.float(), tgt.float(), self.huber_constant(x0))
        return {"loss": (weight * dist).mean(), "distance": dist.mean(),
                "num_scales": torch.tensor(float(len(sigmas))), "weight_mean": weight.mean()}

    def sample(self, model, z, steps, *, randn: Randn, labels=None):
        """CM's multistep sampler (Song et al. 2023, Algorithm 1) through sigma_max and `mid_sigmas`."""
        sigmas = multistep_sigmas(steps, self.mid_sigmas, self.sigma_max, self.sigma_min, self.rho)
        return consistency_multistep(lambda x, s: model(x, s, labels), z, sigmas, randn, self.sigma_min)

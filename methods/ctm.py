"""Consistency Trajectory Models (Kim et al. 2023, arXiv:2310.02279), without the GAN term.

CTM learns the anytime-to-anytime jump G_theta(x_t, t, s) ~ Phi_{t -> s}(x_t) along the teacher's PF-ODE, with
G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s) and g an EDM-preconditioned x0-prediction given the second time s.
Each iteration draws k teacher Heun steps, a start t, an intermediate u and an end s on the Karras grid, and
matches G_sg(G_theta(x_t, t, s), s, sigma_min) to sg G_sg(G_sg(x_u, u, s), s, sigma_min), plus EDM's denoising
loss with VQGAN's adaptive weight.  Equations, the gamma-sampler and departures from the released code
(Kim-Dongjun/ctm-cifar10): docs/methods.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from core.conventions import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, append_dims, require_noise_range, time_vector
from core.errors import require
from core.jvp import SharedRandomness
from core.losses import Distance, consistency_distance
from core.ode import heun_step
from core.precond import EDMDenoiser
from core.samplers import multistep_sigmas
from core.schedules import karras_sigmas, lognormal_sigma

from .base import Method, Randn
from .registry import register


class CTMJump(EDMDenoiser):
    """G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s), with g = EDM's denoiser given the second time s.

    `g` is exactly EDMDenoiser's output (the backbone sees c_in x, ln(t)/4 and ln(s)/4); the module keeps the
    backbone as `.backbone`, so the loop loads the teacher's weights into it.
    """

    def g(self, x: torch.Tensor, t, s, labels=None) -> torch.Tensor:
        return super().forward(x, t, labels, s=s)

    def forward(self, x: torch.Tensor, t, s, labels=None) -> torch.Tensor:
        t, s = time_vector(t, x, x.dtype), time_vector(s, x, x.dtype)
        ratio = append_dims(s / t, x.ndim)
        return ratio * x + (1 - ratio) * self.g(x, t, s, labels)


def output_layer_weight(model: torch.nn.Module) -> torch.nn.Parameter:
    """The weight of the backbone's output layer: its last registered trainable parameter with >= 2 dimensions.

    Both shared backbones register their output layer last (MLP `out`, UNet `out_conv`); the official CIFAR-10 code
    uses DDPM++'s output convolution (`dec['32x32_aux_conv'].weight`), the ImageNet code the last block's conv.
    """
    weights = [p for p in model.backbone.parameters() if p.requires_grad and p.ndim >= 2]
    if not weights:
        raise ValueError("the backbone has no trainable weight matrix for the adaptive DSM weight")
    return weights[-1]


def _frozen(module: torch.nn.Module):
    """Call `module` with its parameters detached: gradients reach the inputs, never the weights (G_sg)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return lambda *args: torch.func.functional_call(module, params, args)


@register
@dataclass(frozen=True)
class CTM(Method):
    """CTM + DSM, distilled from the EDM teacher; defaults = CIFAR-10 (N = 18, K_max = 17, EMA 0.999, gamma = 0)."""

    name = "ctm"
    needs_teacher = True
    default_init = "teacher"
    needs_second_time_input = True

    N: int = 18  # Karras grid size (`start_scales`; 40 on ImageNet-64)
    K_max: int = 17  # largest number of teacher Heun steps (`num_heun_step`; 39 on ImageNet-64)
    k_power: float = 1.0  # p(k) ∝ k^k_power (`heun_step_multiplier`)
    target_ema: float = 0.999  # mu of the target network theta- (`start_ema`)
    target_inner: Literal["ema", "online"] = "ema"
    distance: Distance = "l2"
    huber_c: float | None = None  # None: 0.00054 sqrt(D)
    dsm: bool = True  # `diffusion_training`
    dsm_balance: Literal["adaptive", "fixed"] = "adaptive"  # `apply_adaptive_weight`
    dsm_weight: float = 1.0  # `denoising_weight`: multiplies the (adaptive or fixed) DSM weight
    dsm_weight_max: float = 1e4  # clamp of the adaptive ratio
    dsm_P_mean: float = -1.2
    dsm_P_std: float = 1.2
    dsm_grid_mult: float = 0.7  # `diffusion_mult`: the uniform half covers this fraction of the rho-space
    gan: bool = False
    gamma: float = 0.0
    mid_sigmas: list[float] = field(default_factory=list)  # empty: the Karras grid of steps + 1 levels
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO

    def __post_init__(self):
        require(not self.gan, "gan", "the GAN term (StyleGAN-XL discriminator) is not implemented; set gan: false")
        require(self.N >= 2, "N", "must be >= 2")
        require(1 <= self.K_max <= self.N - 1, "K_max", f"must lie in [1, N - 1] = [1, {self.N - 1}]")
        require(self.k_power >= 0, "k_power", "must be >= 0")
        require(0.0 <= self.target_ema < 1.0, "target_ema", "must lie in [0, 1)")
        require(self.huber_c is None or self.huber_c >= 0, "huber_c", "must be >= 0 (or null for 0.00054 sqrt(D))")
        require(self.dsm_weight >= 0, "dsm_weight", "must be >= 0")
        require(self.dsm_weight_max > 0, "dsm_weight_max", "must be > 0")
        require(self.dsm_P_std > 0, "dsm_P_std", "must be > 0")
        require(0.0 < self.dsm_grid_mult <= 1.0, "dsm_grid_mult", "must lie in (0, 1]")
        require(0.0 <= self.gamma <= 1.0, "gamma", "must lie in [0, 1]")
        require_noise_range(self.sigma_min, self.sigma_max, self.sigma_data)

    # -- parameterization and times
    def build_model(self, backbone):
        return CTMJump(backbone, self.sigma_data)

    def grid(self, device=None) -> torch.Tensor:
        """sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min (float64)."""
        return karras_sigmas(self.N, self.sigma_min, self.sigma_max, self.rho, device=device)

    def k_probs(self) -> torch.Tensor:
        k = torch.arange(1, self.K_max + 1, dtype=torch.float64)
        p = k**self.k_power
        return p / p.sum()

    def sample_indices(self, batch: int, device=None) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(k, n, j): k ~ p(k) once per batch, n ~ U{0..N-1-k}, j ~ U{n+k..N-1} per sample."""
        k = int(torch.multinomial(self.k_probs(), 1).item()) + 1
        n = torch.randint(0, self.N - k, (batch,), device=device)
        span = self.N - n - k  # number of admissible j for each sample
        j = n + k + (torch.rand(batch, device=device, dtype=torch.float64) * span).long().clamp_max(span - 1)
        return k, n, j

    def dsm_sigmas(self, batch: int, device=None) -> torch.Tensor:
        """Half lognormal(P_mean, P_std), half uniform in rho-space over the first dsm_grid_mult of the grid."""
        half = batch // 2
        ln = lognormal_sigma(half, self.dsm_P_mean, self.dsm_P_std, device=device)
        r = torch.rand(batch - half, device=device) * self.dsm_grid_mult
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return torch.cat([ln, (hi + r * (lo - hi)) ** self.rho])

    # -- loss
    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        if teacher is None or target is None:
            raise ValueError("ctm distills a teacher into an EMA target network: pass teacher= and target= "
                             "(the loop does)")
        grid = self.grid(x0.device)
        k, n, j = self.sample_indices(x0.shape[0], x0.device)
        t, s = grid[n].to(x0.dtype), grid[j].to(x0.dtype)
        s_min = torch.full_like(t, self.sigma_min)
        x_t = x0 + append_dims(t, x0.ndim) * torch.randn_like(x0)
        G_sg = _frozen(target)
        inner_net = target if self.target_inner == "ema" else model
        rng = SharedRandomness(x0.device)  # the same dropout masks on both sides (a no-op without dropout)
        with torch.no_grad():
            x_u = x_t
            for i in range(k):
                x_u = heun_step(teacher.denoise, x_u, grid[n + i].to(x0.dtype), grid[n + i + 1].to(x0.dtype))
            u = grid[n + k].to(x0.dtype)
            with rng.replay():
                x_s = inner_net(x_u, u, s, labels)
            with rng.replay():
                ctm_target = target(x_s, s, s_min, labels)
        with rng.replay():
            x_s_theta = model(x_t, t, s, labels)
        with rng.replay():
            estimate = G_sg(x_s_theta, s, s_min, labels)
        l_ctm = consistency_distance(estimate, ctm_target, self.distance, self.huber_c).mean()
        terms = {"ctm": l_ctm.detach(), "k": torch.tensor(float(k))}
        if not self.dsm:
            return {"loss": l_ctm, **terms}

        sigma = self.dsm_sigmas(x0.shape[0], x0.device).to(x0.dtype)
        x_sigma = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        lam = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        denoised = model.g(x_sigma, sigma, sigma, labels)
        l_dsm = (lam * (denoised - x0).flatten(1).float().square().mean(1)).mean()
        w = self.dsm_weight * (self.adaptive_weight(model, l_ctm, l_dsm) if self.dsm_balance == "adaptive" else 1.0)
        w = torch.as_tensor(w, dtype=l_dsm.dtype, device=l_dsm.device)
        return {"loss": l_ctm + w * l_dsm, **terms, "dsm": l_dsm.detach(), "dsm_weight": w.detach()}

    def adaptive_weight(self, model, l_ctm: torch.Tensor, l_dsm: torch.Tensor) -> torch.Tensor:
        """sg clamp(||dL_CTM/dW|| / (||dL_DSM/dW|| + 1e-4), 0, dsm_weight_max) at the output layer W."""
        W = output_layer_weight(model)
        if not (torch.is_grad_enabled() and l_ctm.requires_grad and l_dsm.requires_grad):
            return torch.ones((), device=W.device)  # evaluated without a graph (no training step): unit weight
        g_ctm, = torch.autograd.grad(l_ctm, W, retain_graph=True, allow_unused=True)
        g_dsm, = torch.autograd.grad(l_dsm, W, retain_graph=True, allow_unused=True)
        n_ctm = g_ctm.norm() if g_ctm is not None else W.new_zeros(())
        n_dsm = g_dsm.norm() if g_dsm is not None else W.new_zeros(())
        return (n_ctm / (n_dsm + 1e-4)).clamp(0.0, self.dsm_weight_max).detach()

    def target_decay(self, progress):
        return self.target_ema

    # -- sampler
    def sample_sigmas(self, steps: int) -> list[float]:
        """t_0 = sigma_max > ... > t_steps = sigma_min: the Karras grid of steps + 1 levels or the given mids."""
        return [*multistep_sigmas(steps, self.mid_sigmas, self.sigma_max, self.sigma_min, self.rho), self.sigma_min]

    def sample(self, model, z, steps, *, randn: Randn, labels=None):
        """gamma-sampling: x <- G(x, t_n, s_n) + sqrt(t_{n+1}^2 - s_n^2) z_n, s_n = sqrt(1 - gamma^2)(t_{n+1} -
        sigma_min) + sigma_min; the last jump lands on sigma_min and returns the x0 estimate."""
        sigmas = self.sample_sigmas(steps)
        ones = z.new_ones(z.shape[0])
        x = z * sigmas[0]
        for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
            s = math.sqrt(1.0 - self.gamma**2) * (t_next - self.sigma_min) + self.sigma_min
            x = model(x, ones * t, ones * s, labels)
            if i < steps - 1 and self.gamma > 0:
                x = x + math.sqrt(max(t_next**2 - s**2, 0.0)) * randn(x)
        return x

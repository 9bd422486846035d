"""Consistency Trajectory Models (Kim et al. 2023, arXiv:2310.02279, ICLR 2024), without the GAN term.

CTM learns the anytime-to-anytime jump G_theta(x_t, t, s) ~ Phi_{t -> s}(x_t) along the teacher's PF-ODE:

    g(x, t, s)  = EDM-preconditioned x0-prediction with an extra embedding of s (common.precond.EDMDenoiser with
                  the backbone's zero-initialized s-branch, so a teacher-initialized g starts as the teacher)
    G(x, t, s)  = (s/t) x + (1 - s/t) g(x, t, s)            ("euler" outer parameterization: G(x, t, t) = x)

Each iteration (official code: Kim-Dongjun/ctm-cifar10 `cm/karras_diffusion.py` `ctm_losses`, `cm/resample.py`):

    k ~ p(k) ∝ k on {1..K_max}, one k per batch      (`heun_step_strategy='weighted'`, multiplier 1)
    n ~ U{0..N-1-k},  t = sigma_n,  u = sigma_{n+k}   (per sample; `UniformSampler.weights` = ones(N - k))
    j ~ U{n+k..N-1},  s = sigma_j                     (per sample, on the grid, both ends included: s = u and
                                                       s = sigma_min both occur; `sample_s_strategy='uniform'`)
    x_t = x0 + t eps,   x_u = k Heun steps of the teacher on the grid from t to u (no gradient)
    estimate = G_sg(G_theta(x_t, t, s), s, sigma_min)             (gradient through G_sg's input, not its weights)
    target   = sg G_sg(G_sg(x_u, u, s), s, sigma_min)
    L_CTM    = d(estimate, target),  lambda = 1 (`weight_schedule='uniform'`)
    L_DSM    = lam(sigma) ||g_theta(x_sigma, sigma, sigma) - x0||^2,  lam = (sigma^2 + sigma_d^2)/(sigma sigma_d)^2
               sigma: the first half of the batch ln sigma ~ N(-1.2, 1.2^2), the second half uniform in the
               Karras rho-space over the first 70% of [sigma_max, sigma_min] (`HalfLogNormalHalfUniformSampler`,
               `diffusion_mult=0.7`: sigma in (0.318, 80]); continuous, not on the N-point grid
    loss     = mean L_CTM + w mean L_DSM,  w = sg clamp(||grad_W L_CTM|| / (||grad_W L_DSM|| + 1e-4), 0, 1e4)
               (VQGAN's adaptive weight at the output layer W; `calculate_adaptive_weight`)

G_sg is the EMA target network theta- (mu = 0.999, `start_ema`, kept by the loop).  `target_inner` chooses the
weights of the target's inner jump G_sg(x_u, u, s): "ema" (default: the paper's Algorithm 1 writes theta_sg, the
EMA, everywhere) or "online" (sg of the current weights: the released code's default `ctm_target_inner_type=
'model_sg'`).

Distance: the paper uses LPIPS on images upsampled to 224; LPIPS needs VGG weights that cannot be fetched offline,
so d is "l2" (per-sample mean of squared errors) or "pseudo_huber" (sqrt(||x - y||^2 + c^2) - c on the per-sample
L2 norm, c = 0.00054 sqrt(D), as in iCT; sony/ctm's `pseudo-huber` applies it per element); results are labelled
with it.  GAN: the paper's best numbers (CIFAR-10 1.98 FID at 1 step) add a StyleGAN-XL discriminator; this is
CTM + DSM without GAN, the benchmark's core row (about 5.19 FID at 1 step on CIFAR-10 in the SCT paper's table).

gamma-sampling (`cm/sample_util.py` `sample_gamma_multistep` / `sample_exact`): on t_0 = sigma_max > ... >
t_steps = sigma_min, s_n = sqrt(1 - gamma^2)(t_{n+1} - sigma_min) + sigma_min and x <- G(x, t_n, s_n) +
sqrt(t_{n+1}^2 - s_n^2) z (no noise after the last jump, which lands on sigma_min).  gamma = 0 (the paper's
deterministic default, `--sampler=exact` in the released commands) jumps along the ODE; gamma = 1 is CM's
multistep sampler with f(x, t) = G(x, t, sigma_min).  One network evaluation per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from common.conventions import append_dims
from common.jvp import SharedRandomness
from common.ode import heun_step
from common.precond import EDMDenoiser
from common.samplers import multistep_sigmas
from common.schedules import karras_sigmas, lognormal_sigma

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
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        ratio = append_dims(s / t, x.ndim)
        return ratio * x + (1 - ratio) * self.g(x, t, s, labels)


def ctm_distance(a: torch.Tensor, b: torch.Tensor, kind: str, c: float | None = None) -> torch.Tensor:
    """Per-sample distance [N]: "l2" = mean over dimensions of (a - b)^2; "pseudo_huber" = sqrt(||a - b||^2 + c^2)
    - c on the per-sample L2 norm, c = 0.00054 sqrt(D) unless given."""
    diff = (a - b).flatten(1).float()
    if kind == "l2":
        return diff.square().mean(1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff.shape[1]) if c is None else c
        return (diff.square().sum(1) + c**2).sqrt() - c
    raise ValueError(f"distance must be 'l2' or 'pseudo_huber', got {kind!r}")


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
    distance: Literal["l2", "pseudo_huber"] = "l2"
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
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        if self.gan:
            raise NotImplementedError("ctm: the GAN term (StyleGAN-XL discriminator) is not implemented; this is "
                                      "CTM + DSM without GAN (set gan: false)")
        if self.N < 2 or not 1 <= self.K_max <= self.N - 1:
            raise ValueError(f"ctm needs N >= 2 and 1 <= K_max <= N - 1, got N={self.N}, K_max={self.K_max}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"ctm: gamma must lie in [0, 1], got {self.gamma}")

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
        l_ctm = ctm_distance(estimate, ctm_target, self.distance, self.huber_c).mean()
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

    def nfe(self, steps: int) -> int:
        return steps

"""sCM: continuous-time consistency training and distillation (Lu & Song 2024, "Simplifying, Stabilizing and
Scaling Continuous-time Consistency Models", arXiv:2410.11081, Algorithm 1).

TrigFlow: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d,
t).  Per iteration one network call with gradient and one JVP without:

    g    = -cos^2(t) (sigma_d F_sg - dx_t/dt) - r (cos(t) sin(t) x_t + sigma_d J),  J = cos(t) sin(t) dF_sg/dt
    loss = e^{-u(t)} w(t) mean_D((F_theta - F_sg - g / (||g|| + c))^2) + u(t),  w(t) = 1 / (sigma_d tan t)

sCT and sCD differ only in the tangent dx_t/dt: the conditional velocity, or the teacher's PF-ODE.  The tangent
bookkeeping, our choices (EDM time input, warm-up as a fraction of training, "rms" normalization) and departures:
docs/methods.md.

Adaptive weighting and a deterministic tangent: the learned u(t) settles at log(w(t) E[mse | t]), so the gradient on
F_theta is ~ g_hat / E[|g_hat|^2 | t]: its gain grows as the residual shrinks.  sCD's tangent with an exact teacher is
deterministic, so nothing bounds the gain and, once the student is nearly consistent, the updates overshoot; sCT's
stochastic tangent keeps E[|g_hat|^2 | t] above its variance, which delays the same degradation.  The paper's loss
stays the default; the mixture tracks turn the weighting off for sCD (docs/methods.md, sCT and sCD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from core.conventions import SIGMA_DATA, TRIGFLOW_T_MAX, append_dims
from core.errors import require
from core.jvp import SharedRandomness
from core.jvp import jvp as directional_derivative
from core.precond import TrigFlowModel
from core.samplers import intermediate_levels, multistep_sigmas

from .base import Method, Randn
from .registry import register


@dataclass(frozen=True)
class _SCM(Method):
    """Shared by sCT and sCD; subclasses only say where the tangent dx_t/dt comes from."""

    needs_logvar_head: ClassVar[bool] = True  # u(t), sCM's adaptive weighting (unused if adaptive_weighting off)
    default_init: ClassVar[str] = "teacher"  # the paper trains both from its teacher

    P_mean: float = -1.0  # CIFAR-10 (paper App. G)
    P_std: float = 1.4  # the paper (App. E.3) and FastGen use 1.8 when sCT starts from an EDM/ECT network
    sigma_data: float = SIGMA_DATA
    time_input: Literal["edm", "identity"] = "edm"
    tangent_warmup: float = 0.025  # fraction of training; paper H = 10k iterations (of 400k on ImageNet-64)
    tangent_norm: Literal["rms", "l2", "none"] = "rms"
    tangent_norm_c: float = 0.1
    prior_weighting: bool = True  # w(t) = 1 / (sigma_d tan t)
    adaptive_weighting: bool = True  # learned u(t); off: u = 0
    jvp: Literal["autograd", "functorch", "finite_difference"] = "autograd"
    jvp_eps: float = 1e-3  # step of the finite-difference fallback (in units of the tangent)
    mid_times: list[float] = field(default_factory=lambda: [1.1])  # TrigFlow times after t_max (paper: 1.1)

    def __post_init__(self):
        require(self.P_std > 0, "P_std", "must be > 0")
        require(self.sigma_data > 0, "sigma_data", "must be > 0")
        require(self.jvp_eps > 0, "jvp_eps", "must be > 0")
        require(self.tangent_warmup >= 0, "tangent_warmup", "must be >= 0 (a fraction of training)")
        require(self.tangent_norm_c > 0, "tangent_norm_c", "must be > 0")
        require(all(0.0 < t < TRIGFLOW_T_MAX for t in self.mid_times), "mid_times",
                f"must lie in (0, t_max = {TRIGFLOW_T_MAX:.4f})")

    # -- parameterization ---------------------------------------------------------------------------------

    def build_model(self, backbone):
        return TrigFlowModel(backbone, self.sigma_data, self.time_input)

    def consistency(self, model, x_t, t, labels=None):
        """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t)."""
        return model.consistency(x_t, t, labels)

    # -- training -------------------------------------------------------------------------------------------

    def sample_t(self, n: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, sigma): sigma = e^tau = sigma_d tan t lognormal(P_mean, P_std), t = arctan(sigma / sigma_d)."""
        sigma = (torch.randn(n, device=device, dtype=dtype) * self.P_std + self.P_mean).exp()
        return torch.atan(sigma / self.sigma_data), sigma

    def warmup(self, progress: float) -> float:
        """Tangent warm-up r = min(1, progress / tangent_warmup) (paper: min(1, iteration / H))."""
        return 1.0 if self.tangent_warmup <= 0 else min(1.0, progress / self.tangent_warmup)

    def dxt_dt(self, x0, z, x_t, t, teacher) -> torch.Tensor:
        raise NotImplementedError

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        """Tangent normalization g / (||g|| + c), per sample; "rms" divides the norm by sqrt(D)."""
        if self.tangent_norm == "none":
            return g
        norm = g.flatten(1).norm(dim=1)
        if self.tangent_norm == "rms":
            norm = norm / math.sqrt(g[0].numel())
        return g / append_dims(norm + self.tangent_norm_c, g.ndim)

    def loss(self, model, x0, *, progress, labels=None, teacher=None, target=None):
        t, _ = self.sample_t(x0.shape[0], device=x0.device, dtype=x0.dtype)
        tt = append_dims(t, x0.ndim)
        z = torch.randn_like(x0) * self.sigma_data
        x_t = torch.cos(tt) * x0 + torch.sin(tt) * z
        with torch.no_grad():
            dxdt = self.dxt_dt(x0, z, x_t, t, teacher)
        terms = self.loss_at(model, x_t, t, dxdt, self.warmup(progress), labels)
        out = {k: v.mean() for k, v in terms.items()}
        out["r"] = torch.tensor(self.warmup(progress))
        return out

    def model_and_jvp(self, model, x_t, t, dxdt, labels=None):
        """(F_theta with grad, u(t) or None, J = cos(t) sin(t) dF/dt without grad), all with one dropout mask.

        J is the JVP of F(x_t, t) at (x_t, t) along (cos t sin t dx_t/dt, cos t sin t): d/dt F(x_t, t) along the
        trajectory with dx_t/dt, times cos t sin t; g then carries the sigma_d factor (FastGen's choice).
        """
        rng = SharedRandomness(x_t.device)  # the same dropout mask in the F_theta call and in the JVP
        with rng.replay():
            if self.adaptive_weighting:
                F, u = model(x_t, t, labels, return_logvar=True)
            else:
                F, u = model(x_t, t, labels), None

        def F_fn(x, time):
            with rng.replay():
                return model(x, time, labels)

        cs = torch.cos(t) * torch.sin(t)
        tangent = (append_dims(cs, x_t.ndim) * dxdt, cs)
        # F at (x_t, t) is known: the finite-difference path then makes two calls instead of three
        _, J = directional_derivative(F_fn, (x_t, t), tangent, method=self.jvp, eps=self.jvp_eps, primal_out=F)
        return F, u, J

    def tangent(self, F_sg, J, x_t, t, dxdt, r: float) -> torch.Tensor:
        """g = -cos^2(t) (sigma_d F_sg - dx_t/dt) - r (cos(t) sin(t) x_t + sigma_d J), before normalization.

        Linear in dx_t/dt (J is too): with the exact teacher, E[sCT's g | x_t] over z is sCD's g.
        """
        cos, sin = append_dims(torch.cos(t), x_t.ndim), append_dims(torch.sin(t), x_t.ndim)
        sd = self.sigma_data
        return -cos**2 * (sd * F_sg - dxdt) - r * (cos * sin * x_t + sd * J)

    def loss_at(self, model, x_t, t, dxdt, r: float, labels=None) -> dict[str, torch.Tensor]:
        """Per-sample sCM loss at given (x_t, t, dx_t/dt) and warm-up r: {"loss", "mse", "logvar", "g_rms"}.

        g_rms is the RMS of the tangent before normalization (logged: it shrinks as f becomes consistent).
        """
        F, u, J = self.model_and_jvp(model, x_t, t, dxdt, labels)
        dtype = torch.promote_types(x_t.dtype, torch.float32)  # the tangent in at least fp32 (paper: fp16 overflow)
        F, J, x_t, dxdt, t = F.to(dtype), J.to(dtype), x_t.to(dtype), dxdt.to(dtype), t.to(dtype)
        F_sg = F.detach()
        g = self.tangent(F_sg, J, x_t, t, dxdt, r)
        g_rms = g.flatten(1).norm(dim=1) / math.sqrt(g[0].numel())
        g = self.normalize(g)
        mse = ((F - F_sg - g) ** 2).flatten(1).mean(dim=1)
        weight = 1.0 / (self.sigma_data * torch.tan(t)) if self.prior_weighting else torch.ones_like(t)
        if u is None:
            u = torch.zeros_like(t)
        u = u.to(dtype)
        loss = torch.exp(-u) * weight * mse + u
        return {"loss": loss, "mse": mse.detach(), "logvar": u.detach(), "g_rms": g_rms.detach()}

    # -- sampling -------------------------------------------------------------------------------------------

    def sample_times(self, steps: int) -> list[float]:
        """[t_max, then steps - 1 intermediate TrigFlow times], descending.

        `mid_times[:steps - 1]` when the list is long enough (the paper's 1.1 for 2 steps); otherwise the interior
        levels of core.samplers.multistep_sigmas (a Karras grid of steps + 1 levels, the same fallback as the
        discrete-time methods) mapped to TrigFlow by t = arctan(sigma / sigma_d).
        """
        mids = intermediate_levels(steps, self.mid_times, lambda n: [math.atan(sigma / self.sigma_data)
                                                                     for sigma in multistep_sigmas(n, [])[1:]])
        times = [TRIGFLOW_T_MAX, *mids]
        if any(b >= a for a, b in zip(times[:-1], times[1:], strict=True)):
            raise ValueError(f"sampling times must descend from t_max = {TRIGFLOW_T_MAX:.4f}: {times}")
        return times

    @torch.no_grad()
    def sample(self, model, z, steps, *, randn: Randn, labels=None):
        """x0 = f(sigma_d z, t_max); then for each later t: x = cos(t) x0 + sin(t) sigma_d eps', x0 = f(x, t)."""
        times = self.sample_times(steps)
        x0 = self.consistency(model, self.sigma_data * z, times[0], labels)
        for t in times[1:]:
            x = math.cos(t) * x0 + math.sin(t) * self.sigma_data * randn(x0)
            x0 = self.consistency(model, x, t, labels)
        return x0


@register
@dataclass(frozen=True)
class SCT(_SCM):
    """sCT: consistency training, dx_t/dt = cos(t) z - sin(t) x0 (an unbiased estimate of the PF-ODE velocity)."""

    name = "sct"

    def dxt_dt(self, x0, z, x_t, t, teacher):
        tt = append_dims(t, x0.ndim)
        return torch.cos(tt) * z - torch.sin(tt) * x0


@register
@dataclass(frozen=True)
class SCD(_SCM):
    """sCD: consistency distillation, dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t), the teacher's PF-ODE.

    With the exact mixture teacher, `adaptive_weighting: false` (the mixture tracks' setting): the paper's learned
    weight e^{-u(t)} w(t) = 1 / E[mse | t] has no floor with a deterministic tangent (module docstring).
    """

    name = "scd"
    needs_teacher: ClassVar[bool] = True

    def dxt_dt(self, x0, z, x_t, t, teacher):
        if teacher is None:
            raise ValueError("sCD distills a teacher: the loop must pass teacher=")
        return teacher.velocity_trigflow(x_t, t).to(x_t.dtype)

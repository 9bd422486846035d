"""FACM: Flow-Anchored Consistency Models (Peng et al. 2025, arXiv:2507.03738; METHODS.md section 7).

Rectified flow with data at t = 1: x_t = t x0 + (1 - t) eps, eps ~ N(0, I).  One network F_theta(x_t, t, r) gives
the velocity averaged from t to the end time r: r = t is the instantaneous velocity (the flow-matching anchor),
r = 1 the average velocity to the data end (the consistency model, x_1 = x_t + (1 - t) F(x_t, t, 1)).  Per
iteration (ali-vilab/FACM `losses.py::FACMLoss`, auxiliary-time branch):

    sigma ~ exp(N(P_mean, P_std^2)),  t = 1 - (2/pi) arctan(sigma),  x_t = t x0 + (1 - t) eps
    v      = teacher.velocity_rf(x_t, t)  (distill, the paper's recipe)  |  x0 - eps  (from scratch)
    L_FM   = mean_D((F(x_t, t, t) - v)^2) + mean_pixels(1 - cos_sim_channels(F(x_t, t, t), v))
    (F_sg, dF/dt) = JVP of F(., ., 1) at (x_t, t) along (v, 1)         (no grad; dF/dt = d_x F . v + d_t F)
    v_bar  = v + (1 - t) dF/dt;   g = F_sg - v_bar
    target = F_sg - (1 - t^p) clamp(g, -1, 1),   p = 0.5
    e      = mean_D((F_theta(x_t, t, 1) - target)^2);   L_CM = cos(pi t / 2) e / sg(e + c)^q,  c = 1e-3, q = 0.5
    loss   = mean(L_CM) + mean(L_FM)

Why v_bar: u(x_t, t) = F(x_t, t, 1) is the average velocity to the data end iff x_t + (1 - t) u(x_t, t) is
constant along the PF-ODE; differentiating in t gives v - u + (1 - t) du/dt = 0, i.e. u = v + (1 - t) du/dt = v_bar.
The target moves F_sg towards v_bar by at most one unit per element, fully near the noise end (t = 0) and not at
all at the data end, where cos(pi t / 2) also switches the consistency loss off and only the anchor trains.

Checked against FACM's losses.py (commit d65cb9b): every sign, the JVP of the r = 1 branch along (v, 1), the
relaxation 1 - t^0.5 (`alpha = 1 - alpha_t ** args.p`, alpha_t = t), the clamp at +-1, beta = cos(pi t / 2), the
detached (e + 1e-3)^0.5 (`norm_l2_loss`), the cosine along dim 1 (channels) and the 1:1 sum agree.  Differences:
- FACM differentiates the primal output of `torch.func.jvp` (one forward with tangents, with grad); we take the JVP
  without grad (common.jvp) and make a second forward with grad at the same point and the same dropout mask: the
  same value and gradient, one forward more per iteration.
- FACM's velocity comes from a frozen copy of the student's initial weights with classifier-free guidance
  (w = 1.75, none for t < 0.125); our teacher is unconditional (ConvertedTeacher has no CFG), so v has no guidance.
- FACM's default time conditioning is the "expanded time interval" (the anchor at time input 2 - t in [1, 2]); we
  use its alternative, the auxiliary time input r (`auxiliary_time_cond=True`, r = t for FM, r = 1 for CM), because
  our student starts from an EDM-preconditioned teacher whose time input is ln(sigma)/4 with sigma = (1 - t)/t: a
  time 2 - t > 1 corresponds to a negative sigma, i.e. no noise level at all, so the anchor would start from an
  input the teacher never saw (in FACM the flow-matching teacher at least sees the expanded inputs as a continuous
  extrapolation of its raw time t, and the anchor still starts untrained).  With the backbone's zero-initialized
  second time input carrying r, both branches start exactly as the teacher (the instantaneous velocity, which is
  also the right limit of the average velocity as t -> 1); r = end time (not a 0/1 flag) keeps F(x, t, r)
  continuous in r, with the two branches meeting at t = 1 as the true velocities do.

Parameterization (FACMVelocity): the rectified-flow velocity from an EDM-preconditioned backbone B(c_in x, c_noise).
With sigma = (1 - t)/t and x_sigma = x_t / t (common.conventions), the EDM teacher's exact rf velocity is
v = (D(x_t / t, sigma) - x_t) / (1 - t), D = c_skip x_sigma + c_out B.  Write R^2 = (1 - t)^2 + sigma_d^2 t^2, so
sqrt(sigma^2 + sigma_d^2) = R / t and
    c_in x_sigma   = x_t / R
    c_skip x_sigma = sigma_d^2 t x_t / R^2
    c_out          = (1 - t) sigma_d / R
    D - x_t        = x_t (sigma_d^2 t - R^2) / R^2 + (1 - t) sigma_d B / R
    sigma_d^2 t - R^2 = (1 - t)(sigma_d^2 t - (1 - t))
so the factor 1 - t cancels exactly:
    F(x_t, t) = (sigma_d^2 t - (1 - t)) / R^2 x_t + (sigma_d / R) B(x_t / R, ln((1 - t)/t) / 4).
R^2 >= sigma_d^2 / (1 + sigma_d^2) = 0.2, so nothing is divided by a small number anywhere in [0, 1] (at t = 0:
F = -x + sigma_d B; at t = 1: F = x + B), whereas the teacher's (D - x_t)/(1 - t) divides a difference of nearly
equal numbers by 1 - t near the data end.  Only the time input diverges at the ends (t = 0 is sigma = infinity,
where sampling starts); it is evaluated at sigma clamped to [sigma_min, sigma_max] = [0.002, 80], the EDM
teacher's range, while the x-coefficients stay exact.  Inside that range F equals the teacher's velocity exactly
at initialization (tests/methods/test_facm.py).  The second time input s = r (rf time, in [0, 1]).

Sampler (FACM `consistency_model_sampler`): from pure noise x = z at t = 0, x_end = x + (1 - t) F(x, t, 1); for
each later time t' re-noise x = t' x_end + (1 - t') eps'.  2 steps: t' = 0.5 (the paper's); with more steps than
`mid_times` covers, FACM's uniform grid t_i = i / steps.  The gmm flow-map ground truth starts at EDM sigma = 80
(start_sigma) from 80 z, while this sampler starts at sigma = infinity: the exact flow from pure noise reaches
sigma = 80 at about x_sigma = 80 z + mean(data) instead of 80 z (the sigma-noised data are N(mean, 80^2 + s^2),
not N(0, 80^2)); on the test mixture (mean (0.06, 0.06)) this moves the exact 1-step target by 4.5e-4 on average
(exact flow maps from sigma = 1e4 at 10001 z vs from 80 at 80 z; 1e3 gives 4.4e-4), over 100x below the 1-step
errors we measure; the quick-track mixture has mean 0, leaving only the O(s^2 / 80^2) variance term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from common.config import require
from common.conventions import SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, append_dims
from common.jvp import SharedRandomness
from common.jvp import jvp as directional_derivative

from .base import Method, Randn
from .registry import register


def _time_vector(v, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A time (float or tensor) as a [N] vector of `dtype` on x's device (tangents of a JVP pass through)."""
    v = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    v = v.to(device=x.device, dtype=dtype).reshape(-1)
    return v.expand(x.shape[0]) if v.numel() == 1 else v


class FACMVelocity(torch.nn.Module):
    """F(x_t, t, r): rectified-flow velocity averaged from t to r, on an EDM-preconditioned backbone.

    F = (sigma_d^2 t - (1 - t)) / R^2 x_t + (sigma_d / R) B(x_t / R, c_noise(t), s=r), R^2 = (1 - t)^2 + sigma_d^2 t^2,
    c_noise(t) = ln(clamp((1 - t)/t, sigma_min, sigma_max)) / 4 (derivation in the module docstring): with the
    teacher's weights and the zero-initialized s-branch, F(x_t, t, r) = teacher.velocity_rf(x_t, t) for every r.
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
        dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32  # coefficients in >= fp32
        t, r = _time_vector(t, x_t, dtype), _time_vector(r, x_t, dtype)
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
    default_init: ClassVar[str] = "teacher"  # METHODS.md: FACM starts from the flow-matching teacher's weights
    needs_second_time_input: ClassVar[bool] = True  # r: r = t flow matching, r = 1 consistency
    start_sigma: ClassVar[float] = 80.0  # the ground truth's start; sampling itself starts at sigma = inf (docstring)

    distill: bool = True  # v from the teacher (the paper's runs: --distill), else v = x0 - eps
    P_mean: float = -0.8  # FACM passes --mean 0.8 and uses P_mean = -mean
    P_std: float = 1.6
    p: float = 0.5  # relaxation alpha(t) = 1 - t^p
    clamp: float = 1.0  # g is clamped to [-clamp, clamp]
    norm_p: float = 0.5  # L_CM = beta e / sg(e + norm_c)^norm_p
    norm_c: float = 1e-3
    sigma_data: float = 0.5
    sigma_min: float = SIGMA_MIN  # EDM-sigma range of the backbone's time input (module docstring)
    sigma_max: float = SIGMA_MAX
    jvp: Literal["autograd", "functorch", "finite_difference"] = "autograd"
    jvp_eps: float = 1e-3  # step of the finite-difference fallback (in units of the tangent)
    mid_times: list[float] = field(default_factory=lambda: [0.5])  # rf times after t = 0 (paper: 0.5 for 2 steps)

    def __post_init__(self):
        require(self.P_std > 0, "P_std", "must be > 0")
        require(self.p > 0, "p", "must be > 0")
        require(self.clamp > 0, "clamp", "must be > 0")
        require(self.norm_c > 0, "norm_c", "must be > 0")
        require(0 < self.sigma_min < self.sigma_max, "sigma_min", "must satisfy 0 < sigma_min < sigma_max")
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
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if steps - 1 <= len(self.mid_times):
            mids = list(self.mid_times[: steps - 1])
        else:
            mids = [i / steps for i in range(1, steps)]
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

    def nfe(self, steps: int) -> int:
        return steps


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: mean_D((pred - target)^2) + mean(1 - cos_sim(pred, target)), the cosine along dim 1 (channels
    of an image, the coordinates of a point) and averaged over the rest (FACM `flow_matching_loss`)."""
    mse = ((pred - target) ** 2).flatten(1).mean(1)
    cos = F.cosine_similarity(pred, target, dim=1)
    return mse + (1 - cos).reshape(cos.shape[0], -1).mean(1)

"""Property tests of core.conventions, with the analytic mixture wherever a quantity must be exact."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from core import conventions as cv
from core.gmm import GaussianMixture

F64 = torch.float64
SD = cv.SIGMA_DATA
# a grid over the whole EDM range, the two ends exactly
SIGMAS = torch.cat([torch.tensor([cv.SIGMA_MIN, SD, cv.SIGMA_MAX], dtype=F64),
                    torch.logspace(math.log10(cv.SIGMA_MIN), math.log10(cv.SIGMA_MAX), 41, dtype=F64)])


def ring8() -> GaussianMixture:
    ang = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    w = torch.tensor([1.0, 2, 1, 3, 1, 2, 1, 1])
    return GaussianMixture(torch.stack([0.7 * ang.cos(), 0.7 * ang.sin()], 1),
                           [0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.05, 0.04], w / w.sum())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def noised(gmm, sigma, seed=0):
    """x_sigma = x0 + sigma eps for a per-sample sigma [N], float64."""
    g = gen(seed)
    x0 = gmm.sample(sigma.numel(), generator=g).double()
    return x0 + sigma[:, None] * torch.randn(sigma.numel(), gmm.dim, generator=g, dtype=F64)


def assert_rows_close(a, b, rel, atol=0.0):
    err = (a - b).norm(dim=-1)
    bound = rel * b.norm(dim=-1) + atol
    worst = (err / bound).max().item()
    assert (err <= bound).all(), f"worst row: err {err.max().item():.3e}, ratio {worst:.3g}"


# ---------------------------------------------------------------------------------------------------
# Time and state maps


def test_time_maps_round_trip():
    t = cv.trig_t_from_sigma(SIGMAS)
    assert ((t > 0) & (t < math.pi / 2)).all()
    torch.testing.assert_close(cv.sigma_from_trig_t(t), SIGMAS, rtol=1e-13, atol=0)
    r = cv.rf_t_from_sigma(SIGMAS)
    assert ((r > 0) & (r < 1)).all()
    torch.testing.assert_close(cv.sigma_from_rf_t(r), SIGMAS, rtol=1e-11, atol=0)  # 1 - t cancels near t = 1
    # and from the other side: trig t <-> rf t through sigma
    tt = torch.linspace(0.01, 1.56, 50, dtype=F64)
    torch.testing.assert_close(cv.trig_t_from_sigma(cv.sigma_from_rf_t(cv.rf_t_from_sigma(cv.sigma_from_trig_t(tt)))),
                               tt, rtol=1e-12, atol=0)
    assert cv.TRIGFLOW_T_MAX == pytest.approx(math.atan(80 / 0.5), rel=1e-15)
    assert cv.TRIGFLOW_T_MAX == pytest.approx(1.5645, abs=1e-4)


def test_state_maps_round_trip_and_match_forward_processes():
    """x_trig = cos(t) x_sigma and x_rf = t x_sigma map x0 + sigma eps onto cos(t) x0 + sin(t) sigma_d eps and
    t x0 + (1 - t) eps: the same noise, pathwise."""
    x0 = torch.randn(SIGMAS.numel(), 3, generator=gen(0), dtype=F64)
    eps = torch.randn(SIGMAS.numel(), 3, generator=gen(1), dtype=F64)
    xs = x0 + SIGMAS[:, None] * eps
    t = cv.trig_t_from_sigma(SIGMAS)
    xt = cv.x_trig_from_sigma(xs, SIGMAS)
    expected = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * SD * eps
    torch.testing.assert_close(xt, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cv.x_sigma_from_trig(xt, t), xs, rtol=1e-12, atol=1e-14)
    r = cv.rf_t_from_sigma(SIGMAS)
    xr = cv.x_rf_from_sigma(xs, SIGMAS)
    torch.testing.assert_close(xr, r[:, None] * x0 + (1 - r)[:, None] * eps, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(cv.x_sigma_from_rf(xr, r), xs, rtol=1e-12, atol=1e-14)
    # sigma given as [N, 1] broadcasts the same way
    torch.testing.assert_close(cv.x_trig_from_sigma(xs, SIGMAS[:, None]), xt, rtol=0, atol=0)


def test_same_snr():
    """SNR = signal scale^2 / noise std^2 is 1/sigma^2 in every convention."""
    t = cv.trig_t_from_sigma(SIGMAS)
    torch.testing.assert_close(torch.cos(t) ** 2 / (torch.sin(t) * SD) ** 2, SIGMAS**-2, rtol=1e-12, atol=0)
    r = cv.rf_t_from_sigma(SIGMAS)
    torch.testing.assert_close(r**2 / (1 - r) ** 2, SIGMAS**-2, rtol=1e-11, atol=0)


# ---------------------------------------------------------------------------------------------------
# Velocities of the exact denoiser


def test_sigma_velocity_is_exact_score():
    g = ring8()
    x = noised(g, SIGMAS)
    torch.testing.assert_close(cv.velocity_sigma(g.denoise, x, SIGMAS), -SIGMAS[:, None] * g.score(x, SIGMAS),
                               rtol=1e-10, atol=1e-12)


def test_trigflow_velocity_is_chain_rule_of_sigma_velocity():
    """d/dt [cos(t) x_sigma(sigma(t))] = -sin(t) x_sigma + cos(t) dx_sigma/dsigma sigma_d / cos(t)^2."""
    g = ring8()
    xs = noised(g, SIGMAS, seed=2)
    t = cv.trig_t_from_sigma(SIGMAS)
    v_sigma = cv.velocity_sigma(g.denoise, xs, SIGMAS)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    expected = -s * xs + c * v_sigma * SD / c**2
    got = cv.velocity_trigflow(g.denoise, cv.x_trig_from_sigma(xs, SIGMAS), t)
    assert_rows_close(got, expected, rel=1e-10, atol=1e-12)
    torch.testing.assert_close(g.teacher().velocity_trigflow(cv.x_trig_from_sigma(xs, SIGMAS), t), got)


def test_rf_velocity_is_chain_rule_of_sigma_velocity():
    """x_rf = t x_sigma(sigma(t)), sigma = (1 - t)/t, dsigma/dt = -1/t^2: dx_rf/dt = x_sigma - v_sigma / t."""
    g = ring8()
    xs = noised(g, SIGMAS, seed=3)
    r = cv.rf_t_from_sigma(SIGMAS)
    v_sigma = cv.velocity_sigma(g.denoise, xs, SIGMAS)
    expected = xs - v_sigma / r[:, None]
    got = cv.velocity_rf(g.denoise, cv.x_rf_from_sigma(xs, SIGMAS), r)
    assert_rows_close(got, expected, rel=1e-10, atol=1e-12)
    torch.testing.assert_close(g.teacher().velocity_rf(cv.x_rf_from_sigma(xs, SIGMAS), r), got)


@pytest.mark.parametrize("t0", [0.3, 1.0])
def test_velocities_are_derivatives_of_the_true_trajectory(t0):
    """Fourth-order central differences (step 1e-3) of the exact trajectory (gmm.flow_map at tolerance 1e-12)
    in TrigFlow and rf time against velocity_trigflow / velocity_rf.  Measured relative error about 1e-9;
    asserted 1e-7."""
    g = ring8()
    sigma0 = float(cv.sigma_from_trig_t(torch.tensor(t0, dtype=F64)))
    xs0 = noised(g, torch.full((20,), sigma0, dtype=F64), seed=4)
    h = 1e-3

    def derivative(f, t):
        return (-f(t + 2 * h) + 8 * f(t + h) - 8 * f(t - h) + f(t - 2 * h)) / (12 * h)

    def x_trig_at(t):
        sigma = float(cv.sigma_from_trig_t(torch.tensor(t, dtype=F64)))
        return math.cos(t) * g.flow_map(xs0, sigma0, sigma, rtol=1e-12, atol=1e-12)

    v = cv.velocity_trigflow(g.denoise, x_trig_at(t0), torch.full((20,), t0, dtype=F64))
    assert_rows_close(v, derivative(x_trig_at, t0), rel=1e-7)

    r0 = float(cv.rf_t_from_sigma(torch.tensor(sigma0, dtype=F64)))

    def x_rf_at(r):
        return r * g.flow_map(xs0, sigma0, (1 - r) / r, rtol=1e-12, atol=1e-12)

    v = cv.velocity_rf(g.denoise, x_rf_at(r0), torch.full((20,), r0, dtype=F64))
    assert_rows_close(v, derivative(x_rf_at, r0), rel=1e-7)


def _integrate(velocity, x, t_start, t_end):
    """Solve dx/dt = velocity(x, t) with DOP853 at rtol = atol = 1e-12 (state stacked, float64)."""
    n, d = x.shape

    def rhs(t, y):
        xt = torch.from_numpy(y).reshape(n, d)
        return velocity(xt, torch.full((n,), float(t), dtype=F64)).reshape(-1).numpy()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny RHS calls; threads only stall on a shared machine
    try:
        sol = solve_ivp(rhs, (t_start, t_end), x.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1].reshape(n, d))


@pytest.mark.parametrize("sigma0", [cv.SIGMA_MAX, 2.0, 0.3])
def test_trigflow_and_rf_odes_follow_the_flow_map(sigma0):
    """The TrigFlow ODE dx_t/dt = velocity_trigflow(D, x_t, t) from t(sigma0) down to t(sigma_min), and the
    rf ODE from t_rf(sigma0) up to t_rf(sigma_min), rescaled to the sigma convention, end where gmm.flow_map
    goes.  (The velocity itself is 0/0 at t = 0, so the data end is sigma_min.)  Measured max per-point
    distance about 1e-11; asserted 1e-9."""
    g = ring8()
    teacher = g.teacher()
    xs = noised(g, torch.full((50,), sigma0, dtype=F64), seed=5)
    target = g.flow_map(xs, sigma0, cv.SIGMA_MIN)

    t0, t1 = (float(cv.trig_t_from_sigma(torch.tensor(s, dtype=F64))) for s in (sigma0, cv.SIGMA_MIN))
    x_end = _integrate(teacher.velocity_trigflow, cv.x_trig_from_sigma(xs, sigma0), t0, t1)
    assert (cv.x_sigma_from_trig(x_end, t1) - target).norm(dim=1).max() < 1e-9

    r0, r1 = (float(cv.rf_t_from_sigma(torch.tensor(s, dtype=F64))) for s in (sigma0, cv.SIGMA_MIN))
    x_end = _integrate(teacher.velocity_rf, cv.x_rf_from_sigma(xs, sigma0), r0, r1)
    assert (cv.x_sigma_from_rf(x_end, r1) - target).norm(dim=1).max() < 1e-9


# ---------------------------------------------------------------------------------------------------
# Parameterization inverses and boundary conditions


def test_trigflow_F_and_denoiser_are_inverses():
    g = ring8()
    xs = noised(g, SIGMAS, seed=6)
    t = cv.trig_t_from_sigma(SIGMAS)
    xt = cv.x_trig_from_sigma(xs, SIGMAS)
    F = cv.trigflow_F(g.denoise, xt, t)
    torch.testing.assert_close(g.teacher().trigflow_F(xt, t), F)
    assert_rows_close(cv.denoiser_from_trigflow_F(F, xt, t), g.denoise(xs, SIGMAS), rel=1e-10, atol=1e-12)
    # the other way: any F defines a denoiser whose trigflow_F is F again
    F_any = torch.randn_like(xt, generator=gen(7))

    def denoiser(x_sigma, sigma):
        tt = cv.trig_t_from_sigma(sigma)
        return cv.denoiser_from_trigflow_F(F_any, torch.cos(tt) * x_sigma, tt.reshape(-1))

    assert_rows_close(cv.trigflow_F(denoiser, xt, t), F_any, rel=1e-9, atol=1e-12)


def test_rf_velocity_and_denoiser_are_inverses():
    g = ring8()
    xs = noised(g, SIGMAS, seed=8)
    r = cv.rf_t_from_sigma(SIGMAS)
    xr = cv.x_rf_from_sigma(xs, SIGMAS)
    v = cv.velocity_rf(g.denoise, xr, r)
    assert_rows_close(cv.denoiser_from_rf_velocity(v, xr, r), g.denoise(xs, SIGMAS), rel=1e-10, atol=1e-12)
    v_any = torch.randn_like(xr, generator=gen(9))

    def denoiser(x_sigma, sigma):
        rr = cv.rf_t_from_sigma(sigma)
        return cv.denoiser_from_rf_velocity(v_any, rr * x_sigma, rr.reshape(-1))

    assert_rows_close(cv.velocity_rf(denoiser, xr, r), v_any, rel=1e-9, atol=1e-12)


def test_boundary_conditions():
    c_skip, c_out, _, _ = cv.cm_boundary_precond(torch.tensor(cv.SIGMA_MIN, dtype=F64))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out, _, _ = cv.cm_boundary_precond(torch.tensor(cv.SIGMA_MIN))  # float32 too
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out, c_in, c_noise = cv.cm_boundary_precond(torch.tensor(1.0, dtype=F64), noise_scale=0.25)
    assert c_noise.item() == 0.0 and c_in.item() == pytest.approx(1 / math.sqrt(1.25))
    for sigma in (1e-4, 1e-6, 1e-8):
        c_skip, c_out, _, _ = cv.edm_precond(torch.tensor(sigma, dtype=F64))
        assert abs(c_skip.item() - 1) <= 5 * sigma**2 and abs(c_out.item()) <= 1.1 * sigma
    # sCM: f(x, 0) = x whatever F is
    x = torch.randn(5, 2, generator=gen(10), dtype=F64)
    F = torch.randn(5, 2, generator=gen(11), dtype=F64)
    assert torch.equal(cv.denoiser_from_trigflow_F(F, x, torch.zeros(5, dtype=F64)), x)


def test_exact_denoiser_recovers_data():
    """A mixture with one tiny component (std 1e-3): D(x0 + sigma eps, sigma) -> x0 as sigma -> 0, and on the
    8-component ring |D(x0 + sigma eps) - x0| = O(sigma)."""
    mu = torch.tensor([[0.3, -0.2]], dtype=F64)
    g = GaussianMixture(mu, [1e-3], [1.0])
    x0 = g.sample(100, generator=gen(12)).double()
    for sigma in (1e-4, 1e-5):
        x = x0 + sigma * torch.randn(100, 2, generator=gen(13), dtype=F64)
        assert (g.denoise(x, sigma) - x0).norm(dim=1).max() < 10 * sigma
        assert (g.denoise(x, sigma) - x).norm(dim=1).max() < 10 * sigma
    g = ring8()
    for sigma in (1e-3, 1e-4):
        sig = torch.full((500,), sigma, dtype=F64)
        x0 = g.sample(500, generator=gen(14)).double()
        eps = torch.randn(500, 2, generator=gen(15), dtype=F64)
        err = (g.denoise(x0 + sigma * eps, sig) - x0).norm(dim=1)
        assert err.max() < 6 * sigma
    assert np.isfinite(g.denoise(x0, 0.0).numpy()).all()


# ---------------------------------------------------------------------------------------------------
# Python-float times follow the tensor's dtype and device


def test_python_float_time_keeps_float64_precision():
    g = ring8()
    xt = noised(g, torch.full((10,), 1.0, dtype=F64), seed=16) * math.cos(1.1)
    exact = cv.velocity_trigflow(g.denoise, xt, torch.full((10,), 1.1, dtype=F64))
    assert_rows_close(cv.velocity_trigflow(g.denoise, xt, 1.1), exact, rel=1e-12)


def test_python_float_time_follows_the_device():
    x = torch.randn(4, 2, device="meta")
    cv.velocity_sigma(lambda x_sigma, sigma: x_sigma * 0, x, 80.0)


def test_teacher_with_labels_conditions_every_convention():
    """Class-conditional distillation: the loop binds each batch's labels, and every velocity sees them."""
    from methods.teacher import EDMTeacher

    class Conditional(torch.nn.Module):  # D(x, sigma, y) = x / (1 + sigma) + y: the label moves the output
        def forward(self, x, sigma, labels=None):
            shift = 0.0 if labels is None else labels.to(x.dtype)[:, None]
            return x / (1 + sigma.reshape(-1, 1)) + shift

    teacher = EDMTeacher().as_teacher(Conditional())
    x, sigma = torch.randn(3, 2), torch.full((3,), 0.7)
    y = torch.tensor([0, 1, 2])
    bound = teacher.with_labels(y)
    assert teacher.with_labels(None) is teacher
    assert torch.equal(bound.denoise(x, sigma), x / 1.7 + y[:, None].float())
    assert torch.equal(bound.velocity_sigma(x, sigma), (x - bound.denoise(x, sigma)) / sigma[:, None])
    assert not torch.equal(bound.velocity_sigma(x, sigma), teacher.velocity_sigma(x, sigma))

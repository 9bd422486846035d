"""CTM (Kim et al. 2023): the jump parameterization, time sampling, losses, gamma-sampler, and ground truth on gmm."""

import copy
import math

import pytest
import torch

from common.sample import StackedRandomGenerator, image_seeds
from core.conventions import ConvertedTeacher
from core.precond import EDMDenoiser
from core.samplers import consistency_multistep
from core.schedules import karras_sigmas
from methods.ctm import CTM, CTMJump, output_layer_weight
from methods.registry import get_method_class

from .conftest import make_run, sample_error, train_method


class TwoTimeNet(torch.nn.Module):
    """A small smooth backbone that really depends on x, t and s (unlike a zero-initialized s-branch)."""

    def __init__(self, dim=2, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp = torch.nn.Parameter(torch.randn(dim, 16, generator=gen) * 0.5)
        self.time = torch.nn.Parameter(torch.randn(2, 16, generator=gen))
        self.out = torch.nn.Parameter(torch.randn(16, dim, generator=gen) * 0.3)
        self.seen_s = []

    def forward(self, x, t, s=None, labels=None, return_logvar=False):
        self.seen_s.append(None if s is None else s.detach().clone())
        ts = torch.stack([t, torch.zeros_like(t) if s is None else s], 1)
        return torch.tanh(x @ self.inp + ts @ self.time) @ self.out


def gmm_teacher():
    from core.gmm import GaussianMixture

    return GaussianMixture([[0.6, 0.0], [0.0, 0.6]], [0.1, 0.1], [0.5, 0.5]).teacher()


def test_registered_with_paper_defaults():
    m = get_method_class("ctm")()
    assert (m.N, m.K_max, m.k_power, m.target_ema, m.gamma, m.dsm_P_mean, m.dsm_P_std, m.dsm_grid_mult) == (
        18, 17, 1.0, 0.999, 0.0, -1.2, 1.2, 0.7)
    assert m.needs_teacher and m.default_init == "teacher" and m.needs_second_time_input
    assert m.target_decay(0.0) == m.target_decay(1.0) == 0.999
    assert m.nfe(1) == 1 and m.nfe(4) == 4
    with pytest.raises(ValueError, match="GAN"):
        CTM(gan=True)
    with pytest.raises(ValueError):
        CTM(N=18, K_max=18)


def test_jump_is_identity_at_s_equal_t_exactly():
    model = CTMJump(TwoTimeNet())
    x = torch.randn(6, 2) * 10
    t = torch.tensor([80.0, 12.3, 1.0, 0.3, 0.01, 0.002])
    assert torch.equal(model(x, t, t), x)


def test_jump_formula_and_second_time_input():
    """G = (s/t) x + (1 - s/t) g, g = c_skip(t) x + c_out(t) F(c_in x, ln t / 4; ln s / 4) (EDM preconditioning)."""
    net = TwoTimeNet()
    model = CTMJump(net)
    x = torch.randn(3, 2)
    t, s = torch.tensor([5.0, 1.0, 0.5]), torch.tensor([2.0, 0.002, 0.1])
    G = model(x, t, s)
    tt, ss = t[:, None], s[:, None]
    c_skip, c_out, c_in = 0.25 / (tt**2 + 0.25), tt * 0.5 / (tt**2 + 0.25).sqrt(), 1 / (tt**2 + 0.25).sqrt()
    g = c_skip * x + c_out * net(c_in * x, t.log() / 4, s.log() / 4)
    assert torch.allclose(G, ss / tt * x + (1 - ss / tt) * g, atol=1e-6)
    assert torch.allclose(net.seen_s[0], s.log() / 4)
    assert torch.allclose(model.g(x, t, s), g, atol=1e-6)


def test_teacher_initialized_student_starts_as_the_teacher():
    """The backbone's s-branch is zero-initialized: with the teacher's weights, g(x, t, s) = D_teacher(x, t)."""
    from core.backbone import MLP

    teacher_net = MLP(2, hidden=32, depth=2)
    student = CTM().build_model(MLP(2, hidden=32, depth=2, second_time_input=True))
    student.backbone.load_state_dict(teacher_net.state_dict(), strict=False)
    x, t, s = torch.randn(5, 2), torch.rand(5) * 10 + 0.01, torch.rand(5) * 0.01 + 0.002
    assert torch.allclose(student.g(x, t, s), EDMDenoiser(teacher_net)(x, t), atol=1e-6)


def exact_joint(N, K_max):
    """P(k, n, j) = p(k) / (N - k) / (N - n - k), p(k) ∝ k, n in {0..N-1-k}, j in {n+k..N-1}."""
    pk = {k: k / sum(range(1, K_max + 1)) for k in range(1, K_max + 1)}
    return {(k, n, j): pk[k] / (N - k) / (N - n - k)
            for k in pk for n in range(N - k) for j in range(n + k, N)}


def test_time_sampling_matches_its_distribution():
    """Against the official samplers' law (k once per batch, weighted; n uniform; s uniform on the grid from u to
    sigma_min inclusive).  40k draws over 35 cells: expected total variation about 0.01; tolerance 0.03."""
    m = CTM(N=6, K_max=5)
    torch.manual_seed(0)
    draws = 40_000
    counts = {}
    for _ in range(draws):
        k, n, j = m.sample_indices(1)
        key = (k, int(n), int(j))
        counts[key] = counts.get(key, 0) + 1
    exact = exact_joint(6, 5)
    assert set(counts) <= set(exact)
    tv = 0.5 * sum(abs(counts.get(c, 0) / draws - p) for c, p in exact.items())
    assert tv < 0.03
    # both ends of s occur: s = u (j = n + k) and s = sigma_min (j = N - 1)
    assert any(j == n + k for k, n, j in counts) and any(j == 5 and j > n + k for k, n, j in counts)


def test_time_sampling_default_grid_marginal_of_k_and_ranges():
    m = CTM()
    torch.manual_seed(1)
    ks = torch.tensor([m.sample_indices(1)[0] for _ in range(20_000)])
    freq = torch.bincount(ks, minlength=18)[1:].double() / len(ks)
    p = torch.arange(1, 18, dtype=torch.float64) / 153
    assert 0.5 * (freq - p).abs().sum() < 0.03  # expected TV about 0.012
    for _ in range(20):
        k, n, j = m.sample_indices(4096)
        assert 1 <= k <= 17 and n.min() >= 0 and (n + k).max() <= 17
        assert (j >= n + k).all() and (j <= 17).all()
        assert ((j - n - k) - (17 - n - k) / 2).double().mean().abs() < 0.3  # E[j | n, k] = (n + k + 17) / 2


def test_dsm_noise_levels():
    """First half ln sigma ~ N(-1.2, 1.2^2); second half sigma = (hi + r (lo - hi))^rho with r ~ U[0, 0.7)."""
    m = CTM()
    torch.manual_seed(0)
    sigma = m.dsm_sigmas(100_000).double()
    ln = sigma[:50_000].log()
    assert abs(ln.mean() + 1.2) < 0.02 and abs(ln.std() - 1.2) < 0.02
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    r = (sigma[50_000:] ** (1 / 7) - hi) / (lo - hi)
    assert r.min() >= -1e-5 and r.max() < 0.7
    assert abs(r.mean() - 0.35) < 0.005 and abs(r.var() - 0.49 / 12) < 0.002
    assert sigma[50_000:].min() > 0.31  # the uniform half stays above sigma(0.7) = 0.318


def heun_by_hand(D, x, a, b):
    d = (x - D(x, a)) / a
    x_e = x + (b - a) * d
    return x + (b - a) * 0.5 * (d + (x_e - D(x_e, b)) / b)


@pytest.mark.parametrize("target_inner", ["ema", "online"])
def test_ctm_loss_and_gradients_reach_only_the_online_network(target_inner):
    """The CTM term against the paper's formula with every stop-gradient written out; no gradient into the
    target network or the teacher, even when their parameters require grad."""
    torch.manual_seed(0)
    m = CTM(dsm=False, target_inner=target_inner)
    model = CTMJump(TwoTimeNet(seed=1))
    target = CTMJump(TwoTimeNet(seed=2))  # a different theta-, parameters left trainable on purpose
    teacher_net = EDMDenoiser(TwoTimeNet(seed=3))
    teacher = ConvertedTeacher(lambda x, sigma: teacher_net(x, sigma))
    x0 = torch.randn(64, 2) * 0.5

    torch.manual_seed(7)
    out = m.loss(model, x0, progress=0.3, teacher=teacher, target=target)
    out["loss"].backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is None for p in teacher_net.parameters())
    grads = [p.grad.clone() for p in model.parameters()]

    # by hand: same draws, target and teacher detached explicitly
    model.zero_grad()
    frozen = copy.deepcopy(target).requires_grad_(False)
    torch.manual_seed(7)
    k, n, j = m.sample_indices(64)
    grid = karras_sigmas(18).float()
    t, u, s = grid[n], grid[n + k], grid[j]
    smin = torch.full_like(t, 0.002)
    x_t = x0 + t[:, None] * torch.randn_like(x0)
    with torch.no_grad():
        x = x_t
        for i in range(k):
            x = heun_by_hand(lambda y, a: teacher_net(y, a), x, grid[n + i][:, None], grid[n + i + 1][:, None])
        inner = frozen if target_inner == "ema" else model
        tgt = frozen(inner(x, u, s), s, smin)
    est = frozen(model(x_t, t, s), s, smin)
    loss = ((est - tgt) ** 2).mean(1).mean()
    loss.backward()
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7)


def test_dsm_term_formula_and_adaptive_balance():
    """L_DSM = lam(sigma) mean((g(x_sigma, sigma, sigma) - x0)^2), lam = (sigma^2 + sigma_d^2)/(sigma sigma_d)^2; the
    adaptive weight makes ||grad_W (w L_DSM)|| = ||grad_W L_CTM|| at the output layer W (below the clamp)."""
    from core.backbone import MLP

    m = CTM()
    model = m.build_model(MLP(2, hidden=32, depth=2, second_time_input=True))
    for p in model.parameters():  # away from the zero init of the output layer and s-branch
        torch.nn.init.normal_(p, std=0.3)
    target = copy.deepcopy(model).requires_grad_(False)
    x0 = torch.randn(128, 2) * 0.5
    torch.manual_seed(3)
    out = m.loss(model, x0, progress=0.0, teacher=gmm_teacher(), target=target)

    # the DSM draws come right after the CTM draws (k, n, j, eps): replay them
    torch.manual_seed(3)
    m.sample_indices(128)
    torch.randn_like(x0)
    sigma = m.dsm_sigmas(128)
    x_sigma = x0 + sigma[:, None] * torch.randn_like(x0)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    g = model.g(x_sigma, sigma, sigma)
    dsm = (lam * ((g - x0) ** 2).mean(1)).mean()
    assert out["dsm"].item() == pytest.approx(dsm.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((out["ctm"] + out["dsm_weight"] * out["dsm"]).item(), rel=1e-5)

    W = output_layer_weight(model)
    assert W is model.backbone.out.weight
    w = out["dsm_weight"].item()
    g_ctm, = torch.autograd.grad(out["loss"] - w * dsm, W, retain_graph=True)  # the CTM part of the graph
    g_dsm, = torch.autograd.grad(dsm, W)
    assert 0 < w < 1e4
    assert w == pytest.approx((g_ctm.norm() / (g_dsm.norm() + 1e-4)).item(), rel=1e-4)
    assert (w * g_dsm).norm().item() == pytest.approx(g_ctm.norm().item(), rel=1e-3)  # ||g_dsm|| >> 1e-4 here

    fixed = CTM(dsm_balance="fixed", dsm_weight=0.5)
    torch.manual_seed(3)
    out_fixed = fixed.loss(model, x0, progress=0.0, teacher=gmm_teacher(), target=target)
    assert out_fixed["dsm_weight"].item() == 0.5
    assert out_fixed["loss"].item() == pytest.approx((out_fixed["ctm"] + 0.5 * out_fixed["dsm"]).item(), rel=1e-5)


def rng_for(n, seed=0):
    return StackedRandomGenerator(torch.device("cpu"), image_seeds(seed, 0, n))


def test_gamma_one_is_cm_multistep_on_the_same_noise():
    model = CTMJump(TwoTimeNet())
    m = CTM(gamma=1.0)
    z = torch.randn(50, 2)
    for steps in (1, 2, 4):
        got = m.sample(model, z, steps, randn=rng_for(50).randn)
        sigmas = m.sample_sigmas(steps)[:-1]
        ref = consistency_multistep(lambda x, t: model(x, t, torch.full_like(t, 0.002)), z, sigmas,
                                    rng_for(50).randn, 0.002)
        assert torch.allclose(got, ref, atol=1e-6)


def test_gamma_zero_is_deterministic_and_follows_the_ode_jumps():
    model = CTMJump(TwoTimeNet())
    m = CTM()  # gamma = 0

    def no_noise(like):
        raise AssertionError("gamma = 0 must not draw noise")

    z = torch.randn(20, 2)
    grid = karras_sigmas(4).tolist()  # 3 steps: 80 > t1 > t2 > sigma_min
    assert m.sample_sigmas(3) == pytest.approx(grid)
    ones = torch.ones(20)
    x = z * 80
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        x = model(x, ones * a, ones * b)
    assert torch.allclose(m.sample(model, z, 3, randn=no_noise), x, atol=1e-6)
    assert torch.allclose(m.sample(model, z, 1, randn=no_noise), model(z * 80, ones * 80, ones * 0.002))


def test_gamma_sampling_formula_with_given_mid_sigmas():
    model = CTMJump(TwoTimeNet())
    gamma = 0.6
    m = CTM(gamma=gamma, mid_sigmas=[2.0, 0.5])
    z = torch.randn(30, 2)
    got = m.sample(model, z, 3, randn=rng_for(30, 1).randn)
    levels = [80.0, 2.0, 0.5, 0.002]
    assert m.sample_sigmas(3) == levels
    rng, ones, x = rng_for(30, 1), torch.ones(30), z * 80
    for i in range(3):
        s = math.sqrt(1 - gamma**2) * (levels[i + 1] - 0.002) + 0.002
        x = model(x, ones * levels[i], ones * s)
        if i < 2:
            x = x + math.sqrt(levels[i + 1] ** 2 - s**2) * rng.randn(x)
    assert torch.allclose(got, x, atol=1e-6)


def test_distills_the_exact_flow_map_on_gmm(tmp_path, gmm, gmm_teacher_dir):
    """From the EDM teacher's weights with the exact mixture as the teacher's ODE, 600 iterations of batch 512.

    Measured (seed 0): 1-step flow-map error 0.604 at init (the teacher's denoiser used as a one-step jump) ->
    0.036 after training (0.024 after 1000 iterations); energy distance 0.0003 (1 step), 0.0006 (2 steps).
    The 1-step energy distance is already at the noise floor of 2000 samples (a true-vs-true draw gives about
    +-0.001), so 2 steps can only be "no worse" within that noise: the 2-step flow-map error is in fact larger
    (0.043), because with so little training the jumps from mid-range t to sigma_min are the least trained
    (t = sigma_n is drawn mostly at large sigma, where k is large)."""
    run = make_run("ctm", train={"iterations": 600}, network={"second_time_input": True})
    method, model = train_method(run, tmp_path / "run", teacher_dir=gmm_teacher_dir)
    one, two = (sample_error(method, model, gmm, steps=s) for s in (1, 2))
    assert one["flow_map_error"] < 0.06
    assert two["energy_distance"] <= one["energy_distance"] + 0.003
    assert two["flow_map_error"] < 0.08

"""iCT (Song & Dhariwal 2023) against its formulas: boundary condition, the N(k) curriculum, the discretized
lognormal, pseudo-Huber, the 1/(sigma_{i+1} - sigma_i) weight, stop-gradient target, sampler, and training on gmm."""

import copy
import math

import pytest
import torch
from scipy import stats

from common.models import build_backbone
from core.losses import ict_huber_c, pseudo_huber
from methods.ict import ICT, ict_num_scales, lognormal_index_probs
from methods.registry import get_method_class

from .conftest import make_run, sample_error, train_method


def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM eq. 5 in plain floats, descending (independent of core.schedules)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]


class ConstantNet(torch.nn.Module):
    def __init__(self, c=0.7):
        super().__init__()
        self.c = c
        self.seen = []

    def forward(self, x, t, s=None, labels=None, return_logvar=False):
        self.seen.append(t.detach().clone())
        return torch.full_like(x, self.c)


class MaskNet(torch.nn.Module):
    """F = dropout(1) * 7: the output is the dropout mask, so two calls agree iff their masks do."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(7.0))

    def forward(self, x, t, s=None, labels=None, return_logvar=False):
        return torch.nn.functional.dropout(torch.ones_like(x), p=0.5, training=self.training) * self.w


class Recorder(torch.nn.Module):
    """A stand-in consistency function that records every (sigma, grad enabled) it is called with."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, sigma, labels=None):
        self.calls.append((sigma.detach().clone(), torch.is_grad_enabled()))
        return self.a * x


def test_registered_with_paper_defaults():
    m = get_method_class("ict")()
    assert (m.P_mean, m.P_std, m.s0, m.s1, m.sigma_data, m.sigma_min, m.sigma_max, m.rho) == (
        -1.1, 2.0, 10, 1280, 0.5, 0.002, 80.0, 7.0)
    assert m.mid_sigmas == [0.821] and m.noise_scale == 0.25 and m.huber_c is None
    assert m.default_init == "random" and not m.needs_teacher
    assert all(m.target_decay(p) is None for p in (0.0, 0.5, 1.0))  # theta- = sg(theta), no EMA copy
    assert m.nfe(1) == 1 and m.nfe(2) == 2


def test_boundary_condition_and_coefficients():
    model = ICT().build_model(ConstantNet(0.7))
    x = torch.randn(4, 2)
    assert torch.equal(model(x, 0.002), x)  # f(x, sigma_min) = x exactly
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    s = sigma[:, None]
    c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
    c_out = 0.5 * (s - 0.002) / (s**2 + 0.25).sqrt()
    assert torch.allclose(model(x, sigma), c_skip * x + c_out * 0.7, atol=1e-6)
    assert torch.allclose(model.backbone.seen[-1], 0.25 * sigma.log())  # c_noise = noise_scale ln(sigma)


@pytest.mark.parametrize("K", [400_000, 8_000, 1_000])
def test_curriculum_matches_formula_when_K_is_a_multiple_of_8(K):
    """N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)) = K/8 here."""
    Kp = K // (int(math.log2(1280 // 10)) + 1)
    ks = sorted({0, 1, K // 2, K - 1, K} | {j * Kp + d for j in range(1, 8) for d in (-1, 0, 1)})
    for k in ks:
        assert ict_num_scales(k / K) == min(10 * 2 ** (k // Kp), 1280) + 1, k
    assert ict_num_scales(0.0) == 11 and ict_num_scales(1.0) == 1281
    assert [ict_num_scales(j / 8) for j in range(9)] == [11, 21, 41, 81, 161, 321, 641, 1281, 1281]


def test_curriculum_floor_of_K_prime_moves_boundaries_by_less_than_the_stage_index():
    """K = 1500: the paper's K' = floor(1500/8) = 187; written in progress, stage j starts at 187.5 j."""
    K, Kp = 1500, 1500 // 8
    for k in range(K + 1):
        paper = min(10 * 2 ** (k // Kp), 1280) + 1
        ours = ict_num_scales(k / K)
        if ours != paper:
            j = k // Kp
            assert j * Kp <= k < j * K / 8 and j <= 8, k  # only in [j floor(K/8), j K/8)


def test_discretized_lognormal_equals_continuous_cdf_differences():
    for n in (11, 161, 1281):
        grid = sorted(karras(n))  # ascending
        law = stats.lognorm(s=2.0, scale=math.exp(-1.1))
        mass = [law.cdf(b) - law.cdf(a) for a, b in zip(grid[:-1], grid[1:], strict=True)]
        expected = torch.tensor(mass, dtype=torch.float64) / sum(mass)
        got = lognormal_index_probs(torch.tensor(grid, dtype=torch.float64), -1.1, 2.0)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-15)
    # mass of an interval ~ pdf(sigma) d sigma with d sigma ~ sigma^(1 - 1/rho) on the Karras grid, so the mode sits
    # at ln sigma = P_mean - P_std^2 / rho = -1.671, not at P_mean
    assert abs(math.log(grid[int(got.argmax())]) - (-1.1 - 4.0 / 7)) < 0.021  # one interval there: 0.021 in ln


@pytest.mark.parametrize("progress,n", [(0.0, 11), (0.13, 21)])
def test_loss_draws_adjacent_pairs_from_the_discretized_lognormal(progress, n):
    """100k pairs from one loss call; chi-square goodness of fit at significance 1e-3 (fixed seed: deterministic)."""
    model, method = Recorder(), ICT()
    torch.manual_seed(0)
    method.loss(model, torch.zeros(100_000, 2), progress=progress)
    (t, grad_t), (r, grad_r) = model.calls
    assert grad_t and not grad_r  # online call with gradients, target call without
    grid = torch.tensor(sorted(karras(n)), dtype=torch.float32)
    i = (r[:, None] - grid[None, :]).abs().argmin(1)
    assert torch.allclose(r, grid[i]) and torch.allclose(t, grid[i + 1])  # r = sigma_i < t = sigma_{i+1}
    counts = torch.bincount(i, minlength=n - 1)[: n - 1].double()
    law = stats.lognorm(s=2.0, scale=math.exp(-1.1))
    g = sorted(karras(n))
    p = torch.tensor([law.cdf(b) - law.cdf(a) for a, b in zip(g[:-1], g[1:], strict=True)])
    p = p / p.sum()
    chi2 = (((counts - 1e5 * p) ** 2) / (1e5 * p)).sum().item()
    assert (1e5 * p).min() > 5  # the chi-square approximation holds
    assert chi2 < stats.chi2.ppf(1 - 1e-3, df=n - 2), chi2


def test_pseudo_huber_and_its_constant():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y = torch.zeros(2, 2)
    c = 0.1
    assert torch.allclose(pseudo_huber(x, y, c), torch.tensor([math.sqrt(25 + c * c) - c, 0.0]))
    # on the per-sample norm, not elementwise: elementwise would give sqrt(9+c^2)+sqrt(16+c^2)-2c
    assert abs(pseudo_huber(x, y, c)[0].item() - (math.sqrt(9 + c * c) + math.sqrt(16 + c * c) - 2 * c)) > 0.05
    assert ict_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))  # 0.0299
    assert ict_huber_c(3 * 64 * 64) == pytest.approx(0.0598, abs=1e-4)
    x, y = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    assert ICT().huber_c is None  # the loss then uses iCT's 0.00054 sqrt(D)
    assert torch.equal(pseudo_huber(x, y, ICT().huber_c), pseudo_huber(x, y, ict_huber_c(192)))
    assert torch.equal(pseudo_huber(x, y, ICT(huber_c=0.03).huber_c), pseudo_huber(x, y, 0.03))


@pytest.mark.parametrize("n,lo,hi", [(11, 0.02883, 67.93), (1281, 2.936, 25585.0)])
def test_weight_positive_and_its_range(n, lo, hi):
    """lambda = 1/(sigma_{i+1} - sigma_i) > 0; largest at the sigma_min end, smallest at sigma_max.  From N = 11 to
    1281 the largest weight grows 377x and the lognormal-expected weight E_p[lambda] 134x (8.42 -> 1129)."""
    g = sorted(karras(n))
    w = [1 / (b - a) for a, b in zip(g[:-1], g[1:], strict=True)]
    assert min(w) > 0 and w[0] == max(w) and w[-1] == min(w)
    assert min(w) == pytest.approx(lo, rel=1e-3) and max(w) == pytest.approx(hi, rel=1e-3)
    progress = 0.0 if n == 11 else 1.0
    grid = ICT().grid(progress)
    assert len(grid) == n and torch.allclose(grid, torch.tensor(g, dtype=torch.float64), rtol=1e-12)
    torch.manual_seed(0)
    out = ICT().loss(Recorder(), torch.randn(4096, 2), progress=progress)
    assert lo <= out["weight_mean"].item() <= hi and out["num_scales"].item() == n
    p = lognormal_index_probs(grid, -1.1, 2.0)
    expected = (p * (1 / (grid[1:] - grid[:-1]))).sum().item()
    assert out["weight_mean"].item() == pytest.approx(expected, rel=0.15)  # 4096 draws of a heavy-tailed weight


def _small_model(dropout=0.3):
    torch.manual_seed(3)
    run = make_run("ict", network={"dropout": dropout})
    return ICT().build_model(build_backbone(run.network, (2,))).train()


def test_loss_formula_and_gradient_only_through_the_online_branch():
    """Recompute the loss by hand with the target from a frozen copy, explicitly detached, on the same dropout
    masks; the values and the gradients must agree, and the copy must receive no gradient."""
    method, model = ICT(), _small_model()
    for p in model.parameters():  # move off the near-zero init so that F matters
        p.data.add_(0.1 * torch.randn_like(p))
    x0 = torch.randn(256, 2) * 0.5
    progress = 0.3
    torch.manual_seed(11)
    out = method.loss(model, x0, progress=progress)
    out["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    frozen = copy.deepcopy(model)
    g = sorted(karras(ict_num_scales(progress)))
    law = stats.lognorm(s=2.0, scale=math.exp(-1.1))
    probs = torch.tensor([law.cdf(b) - law.cdf(a) for a, b in zip(g[:-1], g[1:], strict=True)])
    torch.manual_seed(11)
    i = torch.multinomial(probs / probs.sum(), 256, replacement=True)
    grid = torch.tensor(g, dtype=torch.float64)
    r, t = grid[i].float(), grid[i + 1].float()
    eps = torch.randn_like(x0)
    state = torch.get_rng_state()
    pred = model(x0 + t[:, None] * eps, t)
    torch.set_rng_state(state)
    tgt = frozen(x0 + r[:, None] * eps, r).detach()
    c = 0.00054 * math.sqrt(2)
    weight = 1 / (grid[i + 1] - grid[i]).float()
    ref = (weight * ((((pred - tgt) ** 2).sum(1) + c * c).sqrt() - c)).mean()
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.isfinite(out["loss"])
    for a, p in zip(grads, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in frozen.parameters())
    assert any(a.abs().sum() > 0 for a in grads)


def test_online_and_target_calls_share_the_dropout_mask():
    method = ICT()
    model = method.build_model(MaskNet()).train()
    x0 = torch.zeros(512, 8)
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append((args[0], args[1], out.detach())))
    torch.manual_seed(0)
    method.loss(model, x0, progress=0.5)
    keep = seen[1][1] > 0.003  # rows whose target level is sigma_min have c_out = 0 there: no mask to read
    masks = []
    for x, sigma, out in seen:
        x, sigma, out = x[keep], sigma[keep], out[keep]
        s = sigma[:, None]
        c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
        c_out = 0.5 * (s - 0.002) / (s**2 + 0.25).sqrt()
        masks.append((out - c_skip * x) / c_out)
    assert keep.float().mean() > 0.9 and torch.allclose(masks[0], masks[1], atol=1e-2)
    assert 0.3 < (masks[0].abs() > 1).float().mean() < 0.7  # a real dropout mask (values 0 and 14)


def test_sampler_formula():
    method = ICT()
    model = Recorder()
    z = torch.randn(6, 2)
    noise = [torch.randn(6, 2) for _ in range(3)]
    draws = iter(noise)
    x1 = method.sample(model, z, 1, randn=lambda like: next(draws))
    assert torch.allclose(x1, 0.5 * 80 * z) and torch.allclose(model.calls[-1][0], torch.full((6,), 80.0))
    draws = iter(noise)
    x2 = method.sample(model, z, 2, randn=lambda like: next(draws))
    expected = 0.5 * (0.5 * 80 * z + math.sqrt(0.821**2 - 0.002**2) * noise[0])
    assert torch.allclose(x2, expected, atol=1e-6)
    assert torch.allclose(model.calls[-1][0], torch.full((6,), 0.821))
    model.calls.clear()
    draws = iter(noise)
    method.sample(model, z, 3, randn=lambda like: next(draws))  # one mid level given: a Karras grid of 4 levels
    assert [c[0][0].item() for c in model.calls] == pytest.approx(karras(4)[:3], rel=1e-6)


def test_gmm_from_scratch_reaches_the_flow_map(gmm, tmp_path):
    """Random init, 1000 iterations (N goes 11 -> 1281), MLP 64x2, batch 512, lr 2e-3.

    Measured (seed 0): 1-step flow-map error 0.603 at init -> 0.0835 after training; energy distance 0.458 at
    init -> 0.0015 (1 step) and 0.0019 (2 steps); NLL -0.13 (1 step), 0.61 (2 steps; the mixture's entropy is
    -0.489).  Energy distances of 2000 samples scatter by about +-0.0006 (measured between fresh samples), so
    "2 steps no worse than 1" is asserted within 0.001.  Bounds: about 40% headroom on the flow-map error.
    """
    run = make_run("ict", train={"iterations": 1000, "lr": 2e-3})
    method, model = train_method(run, tmp_path / "run")
    torch.manual_seed(0)
    untrained = method.build_model(build_backbone(run.network, (2,))).eval()
    before = sample_error(method, untrained, gmm, steps=1)
    one = sample_error(method, model, gmm, steps=1)
    two = sample_error(method, model, gmm, steps=2)
    assert one["flow_map_error"] < 0.12 and one["flow_map_error"] < 0.5 * before["flow_map_error"]
    assert one["energy_distance"] < 0.005 < before["energy_distance"]
    assert two["energy_distance"] <= one["energy_distance"] + 0.001

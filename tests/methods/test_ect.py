"""ECT (Geng et al. 2024): r(t), stages, time sampling, loss, stop-gradient, sampler and the gmm flow map."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.backbone import MLP
from core.conventions import edm_precond
from core.errors import BadValue
from methods.ect import ECT, ect_r, ect_stage
from methods.registry import get_method_class

from .conftest import make_run, sample_error, train_method


class ConstantNet(torch.nn.Module):
    """F = c everywhere: isolates the preconditioning."""

    def __init__(self, c=1.0):
        super().__init__()
        self.c = c

    def forward(self, x, t, s=None, labels=None, return_logvar=False):
        return torch.full_like(x, self.c)


class ShiftModel(torch.nn.Module):
    """f(x, sigma) = x + a * dropout(1) * g(sigma): a stand-in for the consistency function with a known loss.

    The dropout draw makes the two calls' masks visible: with shared masks f(x_t, t) - f(x_r, r) has a closed form.
    """

    def __init__(self, a=0.3, p=0.5, g=lambda s: torch.ones_like(s)):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.p, self.g = p, g
        self.sigmas = []

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        self.sigmas.append(sigma.detach().clone())
        mask = F.dropout(torch.ones_like(x), p=self.p, training=True) if self.p > 0 else torch.ones_like(x)
        return x + self.a * mask * self.g(sigma)[:, None]


def _draws(n, d, method, progress, seed):
    """t, r, eps as method.loss draws them after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    t = (torch.randn(n) * method.P_std + method.P_mean).exp()
    r = ect_r(t, ect_stage(progress, method.stages), method.q, method.k, method.b)
    eps = torch.randn(n, d)
    return t, r, eps


def test_registered_with_paper_defaults():
    m = get_method_class("ect")()
    assert isinstance(m, ECT) and m.default_init == "teacher" and not m.needs_teacher
    assert (m.P_mean, m.P_std, m.q, m.k, m.b, m.stages, m.huber_c) == (-1.1, 2.0, 2.0, 8.0, 1.0, 8, 0.0)
    assert m.weighting == "inv_dt" and m.mid_sigmas == [0.821] and m.noise_scale == 0.25 and m.precond == "cm"
    assert m.ts == [] and m.ts_levels is None and not m.clip_denoised  # ECT's generator_fn does not clamp
    assert m.target_decay(0.5) is None and m.nfe(1) == 1 and m.nfe(2) == 2
    run = make_run("ect", params={"mid_sigmas": [1.5, 0.3], "weighting": "snrpk", "huber_c": 0.06, "stages": 4})
    assert run.method_params["mid_sigmas"] == [1.5, 0.3]


def test_preconditioning_variants():
    """cm: the boundary condition always; ecm (locuslab/ect main, ECMPrecond): EDM's coefficients while training,
    the boundary ones at evaluation; edm (imgnet branch, EDM2's Precond): EDM's coefficients always."""
    x = torch.randn(6, 2)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0, 0.5])
    c_skip, c_out, _, _ = edm_precond(sigma[:, None])
    edm = c_skip * x + c_out * 0.7
    for precond in ("cm", "ecm"):
        model = ECT(precond=precond).build_model(ConstantNet(0.7)).eval()
        assert torch.equal(model(x, 0.002), x)  # c_skip = 1, c_out = 0 exactly
        assert not torch.allclose(model(x, sigma), edm, atol=1e-6)
    assert torch.allclose(ECT(precond="ecm").build_model(ConstantNet(0.7)).train()(x, sigma), edm, atol=1e-6)
    assert torch.equal(ECT().build_model(ConstantNet(0.7)).train()(x, 0.002), x)  # cm: also in training
    for mode in ("train", "eval"):
        model = getattr(ECT(precond="edm").build_model(ConstantNet(0.7)), mode)()
        assert torch.allclose(model(x, sigma), edm, atol=1e-6)  # no boundary shift anywhere
    assert ECT().precond == "cm"  # the default keeps the boundary condition
    for bad in ({"precond": "edm2"}, {"weighting": "c_out"}, {"P_mean": float("nan")}):
        with pytest.raises(BadValue) as err:
            ECT(**bad)
        assert err.value.key == next(iter(bad))


def test_imagenet64_paper_track_runs_ects_imagenet_recipe():
    """config/imagenet64.yaml's ect entry is the imgnet branch's recipe (run_imgnet_ecm.sh, preset edm2-img64-s):
    q 4 over 4 stages, snrpk weighting, c 0.06, P_mean -0.8, P_std 1.6, EDM coefficients, 2-step sigma 1.526; Adam
    with betas (0.9, 0.99).  The CIFAR-10 entry is the main branch's (q 2 over 8 stages, 1/(t - r), ECMPrecond)."""
    from pathlib import Path

    from common.config import load_config, resolve_run
    from common.models import build_method

    root = Path(__file__).resolve().parents[2]
    run = resolve_run(load_config(root / "config/imagenet64.yaml"), "imagenet64", "ect", 0)
    m = build_method(run)
    assert (m.q, m.stages, m.k, m.b, m.weighting, m.huber_c) == (4.0, 4, 8.0, 1.0, "snrpk", 0.06)
    assert (m.P_mean, m.P_std, m.precond, m.mid_sigmas) == (-0.8, 1.6, "edm", [1.526])
    assert m.q**m.stages == ECT().q ** ECT().stages  # the last stage's dt/t is the same: 4^4 = 2^8
    assert (run.train.optimizer, run.train.betas) == ("adam", [0.9, 0.99])
    run = resolve_run(load_config(root / "config/cifar10.yaml"), "cifar10", "ect", 0)
    m = build_method(run)
    assert (m.q, m.stages, m.weighting, m.huber_c, m.precond, m.mid_sigmas) == (2.0, 8, "inv_dt", 0.0, "ecm", [0.821])
    assert run.train.iterations == 200_000  # config/published_fid.csv quotes ECT's 200k numbers for this row


@pytest.mark.parametrize("stage", [0, 1, 3, 7, 12])
def test_r_of_t_formula_and_range(stage):
    ts = [1e-3, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0, 500.0]
    r = ect_r(torch.tensor(ts, dtype=torch.float64), stage, q=2.0, k=8.0, b=1.0)
    for ti, ri in zip(ts, r.tolist(), strict=True):
        expected = max(0.0, ti * (1 - 2.0 ** -(stage + 1) * (1 + 8.0 / (1 + math.exp(ti)))))
        assert ri == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert 0.0 <= ri < ti


def test_r_of_t_limits():
    t = torch.logspace(-3, 2.5, 200, dtype=torch.float64)
    # stage 0, q = 2, k = 8, b = 1: r > 0 iff (1 + 8 sigmoid(-t)) / 2 < 1 iff t > ln 7
    r0 = ect_r(t, 0)
    assert torch.equal(r0 > 0, t > math.log(7))
    gaps = [((t - ect_r(t, s)) / t) for s in range(12)]
    for a, b in zip(gaps[:-1], gaps[1:], strict=True):
        assert (b <= a).all()  # r -> t monotonically as the stage grows
    assert gaps[-1].max() < 5 * 2.0**-12 + 1e-12  # (t - r)/t = q^-(s+1)(1 + k sigmoid(-bt)) <= 5 q^-(s+1)
    assert torch.allclose(gaps[3], 2.0**-4 * (1 + 8 * torch.sigmoid(-t)))  # no clamping from stage 3 on
    assert torch.equal(ect_r(t, 2, k=0.0), t * (1 - 2.0**-3))  # k = 0: ECT's constant-ratio mapping


def test_stage_is_a_pure_function_of_progress():
    cases = {0.0: 0, 0.124: 0, 0.125: 1, 0.3: 2, 0.5: 4, 0.874: 6, 0.875: 7, 0.9999: 7, 1.0: 7}
    for p, s in cases.items():
        assert ect_stage(p, 8) == s
        assert ECT().stage(p) == s
    assert [ECT(stages=4).stage(p) for p in (0.0, 0.26, 0.5, 0.99)] == [0, 1, 2, 3]
    assert ECT(stages=1).stage(0.9) == 0
    with pytest.raises(ValueError):
        ECT(stages=0)


def test_time_distribution_is_lognormal():
    model = ShiftModel(p=0.0)
    n = 20000
    torch.manual_seed(0)
    ECT().loss(model, torch.zeros(n, 2), progress=0.0)
    ln_t = model.sigmas[0].double().log()
    # standard errors: mean 2/sqrt(n) = 0.014, std 2/sqrt(2n) = 0.010; tolerances are 4 standard errors
    assert ln_t.mean().item() == pytest.approx(-1.1, abs=0.06)
    assert ln_t.std().item() == pytest.approx(2.0, abs=0.04)


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.95])
@pytest.mark.parametrize("huber_c,weighting", [(0.0, "inv_dt"), (0.06, "inv_dt"), (0.0, "snrpk")])
def test_loss_matches_formula_with_r_zero_target_x0(progress, huber_c, weighting):
    """f(x, s) = x + 0.3 sigma: the target f(x_r, r) = x_r + 0.3 r where r > 0, and exactly x0 where r = 0."""
    method = ECT(huber_c=huber_c, weighting=weighting)
    model = ShiftModel(a=0.3, p=0.0, g=lambda s: s)
    n = 512
    x0 = torch.randn(n, 2) * 0.5
    torch.manual_seed(3)
    got = method.loss(model, x0, progress=progress)
    t, r, eps = _draws(n, 2, method, progress, 3)
    target = torch.where((r > 0)[:, None], x0 + r[:, None] * eps + 0.3 * r[:, None], x0)
    sq = ((x0 + t[:, None] * eps + 0.3 * t[:, None] - target) ** 2).sum(1)
    d = torch.sqrt(sq + huber_c**2) - huber_c
    w = 1 / (t - r) if weighting == "inv_dt" else (t**2 + 0.25) / (t * 0.5) ** 2
    assert torch.isfinite(got["loss"])
    assert got["loss"].item() == pytest.approx((w * d).mean().item(), rel=1e-5)
    assert got["frac_r_zero"].item() == pytest.approx((r == 0).float().mean().item())
    if progress == 0.0:
        assert 0.5 < got["frac_r_zero"].item() < 1.0  # stage 0: r = 0 wherever t < ln 7


def test_all_r_zero_is_diffusion_training_with_one_call():
    method = ECT(P_mean=-5.0, P_std=0.01)  # t ~ 0.0067 < ln 7: r = 0 everywhere at stage 0
    model = ShiftModel(a=0.3, p=0.0)
    x0 = torch.randn(64, 2)
    torch.manual_seed(5)
    got = method.loss(model, x0, progress=0.0)
    t, r, eps = _draws(64, 2, method, 0.0, 5)
    assert (r == 0).all() and len(model.sigmas) == 1
    expected = ((t[:, None] * eps + 0.3).norm(dim=1) / t).mean()
    assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_shared_dropout_mask_and_gradient_only_through_online_branch():
    """f = x + a m (m a dropout mask): with the same m in both calls and sg on the target,
    d = f(x_t) - sg f(x_r) = (t - r) eps + a m - sg(a m), so dL/da = mean_i [m_i . eps_i / ||eps_i||] / (t_i - r_i)
    where r_i > 0 (and [m_i . (t eps_i + a m_i) / ||t eps_i + a m_i||] / t_i where r_i = 0: target x0)."""
    method = ECT()
    progress, n = 0.4, 4096  # stage 3: every r > 0
    model = ShiftModel(a=0.3, p=0.5)
    x0 = torch.randn(n, 2) * 0.5
    torch.manual_seed(11)
    out = method.loss(model, x0, progress=progress)
    out["loss"].backward()
    t, r, eps = _draws(n, 2, method, progress, 11)
    assert (r > 0).all()
    # with shared masks, the value is ||(t - r) eps|| / (t - r) = ||eps|| whatever the masks are
    assert out["loss"].item() == pytest.approx(eps.norm(dim=1).mean().item(), rel=1e-5)
    # recover the mask from the recorded online call: replay the RNG state right after eps
    torch.manual_seed(11)
    torch.randn(n)
    torch.randn(n, 2)
    m = F.dropout(torch.ones(n, 2), p=0.5, training=True)
    grad = ((m * eps).sum(1) / eps.norm(dim=1) / (t - r)).mean()
    assert model.a.grad.item() == pytest.approx(grad.item(), rel=1e-4)


def test_gradients_reach_the_backbone_and_equal_the_detached_target_gradient():
    torch.manual_seed(0)
    backbone = MLP(2, hidden=32, depth=2, dropout=0.3)
    for p in backbone.parameters():  # leave EDM's near-zero init so every layer gets a gradient
        torch.nn.init.normal_(p, std=0.2)
    method = ECT()
    model = method.build_model(backbone).train()
    x0 = torch.randn(256, 2) * 0.5
    torch.manual_seed(1)
    loss = method.loss(model, x0, progress=0.6)["loss"]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) == len(grads)

    # the same loss written out, with the target computed on a detached copy (theta- = sg(theta))
    import copy

    frozen = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(1)
    t, r, eps = _draws(256, 2, method, 0.6, 1)
    state = torch.get_rng_state()
    pred = model(x0 + t[:, None] * eps, t)
    torch.set_rng_state(state)
    tgt = frozen(x0 + r[:, None] * eps, r)
    manual = ((pred - tgt).norm(dim=1) / (t - r)).mean()
    manual_grads = torch.autograd.grad(manual, list(model.parameters()))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    for g, h in zip(grads, manual_grads, strict=True):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-7)


def test_sampler_formula():
    model = lambda x, s, labels=None: torch.tanh(x) * s.reshape(-1, 1) / (1 + s.reshape(-1, 1))  # noqa: E731
    z = torch.randn(5, 2)
    noise = torch.randn(5, 2)
    randn = lambda like: noise  # noqa: E731
    x1 = ECT().sample(model, z, 1, randn=randn)
    assert torch.allclose(x1, model(80 * z, torch.tensor(80.0)))
    x2 = ECT().sample(model, z, 2, randn=randn)
    s = torch.tensor(0.821)
    assert torch.allclose(x2, model(x1 + math.sqrt(0.821**2 - 0.002**2) * noise, s))
    x3 = ECT(mid_sigmas=[2.0, 0.5]).sample(model, z, 3, randn=randn)
    y = ECT().sample(model, z, 1, randn=randn)
    for sig in (2.0, 0.5):
        y = model(y + math.sqrt(sig**2 - 0.002**2) * noise, torch.tensor(sig))
    assert torch.allclose(x3, y)


def test_gmm_tuning_from_the_teacher_learns_the_flow_map(gmm, gmm_teacher_dir, tmp_path):
    """800 iterations from the EDM teacher (100 per stage), lr 1e-3, batch 512, MLP 64x2.

    Measured (2 cores): 1-step flow-map error 0.60 at init (the teacher's denoiser at sigma 80, i.e. about the data
    mean) -> 0.10 after tuning; energy distance 0.42 -> 0.007 (1 step), 0.004 (2 steps).
    """
    run = make_run("ect", train={"iterations": 800, "lr": 1e-3})
    method, model = train_method(run, tmp_path / "run", teacher_dir=gmm_teacher_dir)
    from common.models import build_backbone, load_trained

    _, _, teacher, _ = load_trained(gmm_teacher_dir, torch.device("cpu"))
    init = method.build_model(build_backbone(run.network, (2,))).eval()
    init.backbone.load_state_dict(teacher.backbone.state_dict())
    before = sample_error(method, init, gmm, steps=1)
    one = sample_error(method, model, gmm, steps=1)
    two = sample_error(method, model, gmm, steps=2)
    assert one["flow_map_error"] < 0.18  # measured 0.10
    assert one["flow_map_error"] < 0.4 * before["flow_map_error"]
    assert one["energy_distance"] < 0.03 < before["energy_distance"]
    # 2 steps re-noise to sigma 0.821 and denoise again; allow the energy distance's sampling noise (about 0.003)
    assert two["energy_distance"] < one["energy_distance"] + 0.005

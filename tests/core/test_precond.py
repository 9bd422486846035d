"""Parameterization wrappers: formulas, boundary conditions, and the EDM -> TrigFlow re-expression being exact."""

import math

import pytest
import torch

from core.backbone import MLP
from core.conventions import trigflow_F
from core.precond import CMDenoiser, EDMDenoiser, TrigFlowModel


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    net = MLP(2, hidden=32, depth=2)
    with torch.no_grad():  # a non-trivial output layer (it is initialized near zero)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def test_cm_boundary_condition_is_exact(backbone):
    f = CMDenoiser(backbone)
    x = torch.randn(16, 2)
    assert torch.equal(f(x, 0.002), x)


def test_trigflow_edm_time_input_reexpresses_the_edm_denoiser(backbone):
    """f_trig(x_t, t) = cos t x_t - sin t sigma_d F equals EDM's D(x_t / cos t, sigma_d tan t), for every t."""
    edm = EDMDenoiser(backbone)
    trig = TrigFlowModel(backbone, time_input="edm")
    x_t = torch.randn(32, 2)
    t = torch.rand(32) * 1.5 + 0.03
    sigma = 0.5 * torch.tan(t)
    x_sigma = x_t / torch.cos(t)[:, None]
    with torch.no_grad():  # float32 throughout: agreement to float32 rounding
        got = trig.consistency(x_t, t)
        expect = edm(x_sigma, sigma)
        F_conv = trigflow_F(lambda a, s: edm(a, s), x_t, t)
        F_trig = trig(x_t, t)
    assert torch.allclose(got, expect, atol=1e-4, rtol=1e-4)
    assert torch.allclose(F_trig, F_conv, atol=1e-3, rtol=1e-3)  # the same velocity the conversion layer gives


def test_trigflow_boundary_and_identity_time(backbone):
    trig = TrigFlowModel(backbone, time_input="identity")
    x = torch.randn(8, 2)
    assert torch.allclose(trig.consistency(x, torch.zeros(8)), x)
    assert trig.c_noise(torch.tensor([0.3])).item() == pytest.approx(0.3)
    edm_time = TrigFlowModel(backbone).c_noise(torch.tensor([1.0]))
    assert edm_time.item() == pytest.approx(math.log(0.5 * math.tan(1.0)) / 4, rel=1e-6)
    with pytest.raises(ValueError):
        TrigFlowModel(backbone, time_input="log")

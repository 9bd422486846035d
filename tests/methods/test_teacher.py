"""The EDM teacher: preconditioning, loss and Heun sampler against EDM's formulas and the exact flow map."""

import pytest
import torch

from common.sample import StackedRandomGenerator, image_seeds
from core.conventions import velocity_trigflow
from core.gmm import GaussianMixture
from methods.registry import get_method_class
from methods.teacher import EDMDenoiser, EDMTeacher


class ConstantNet(torch.nn.Module):
    """F = c everywhere: isolates the preconditioning."""

    def __init__(self, c=0.0):
        super().__init__()
        self.c = c
        self.seen = []

    def forward(self, x, t, s=None, labels=None, return_logvar=False):
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return torch.full_like(x, self.c)


def test_registered_with_paper_defaults():
    m = get_method_class("teacher")()
    assert (m.P_mean, m.P_std, m.sigma_data, m.sigma_min, m.sigma_max, m.rho) == (-1.2, 1.2, 0.5, 0.002, 80.0, 7.0)
    assert m.nfe(18) == 35 and m.nfe(1) == 1


def test_edm_preconditioning_formula():
    net = ConstantNet(c=1.0)
    D = EDMDenoiser(net, 0.5)
    x = torch.randn(3, 2)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = D(x, sigma)
    s = sigma[:, None]
    c_skip = 0.25 / (s**2 + 0.25)
    c_out = s * 0.5 / (s**2 + 0.25).sqrt()
    assert torch.allclose(out, c_skip * x + c_out, atol=1e-6)
    x_in, c_noise = net.seen[-1]
    assert torch.allclose(x_in, x / (s**2 + 0.25).sqrt(), atol=1e-6)
    assert torch.allclose(c_noise, sigma.log() / 4)


def test_loss_matches_edm_formula():
    method = EDMTeacher()
    model = EDMDenoiser(ConstantNet(0.0))
    x0 = torch.randn(64, 2)
    torch.manual_seed(1)
    got = method.loss(model, x0, progress=0.0)
    torch.manual_seed(1)
    sigma = (torch.randn(64) * 1.2 - 1.2).exp()
    n = torch.randn_like(x0) * sigma[:, None]
    D = 0.25 / (sigma[:, None] ** 2 + 0.25) * (x0 + n)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * ((D - x0) ** 2).mean(1)).mean()
    assert got["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_exact_denoiser_sampler_reaches_the_flow_map():
    """With the exact mixture denoiser in place of a network, Heun converges to Phi_{80->0}."""
    gmm = GaussianMixture([[0.5, 0.0], [-0.5, 0.0]], [0.1, 0.15], [0.3, 0.7])
    exact_model = lambda x, sigma, labels=None: gmm.denoise(x, sigma)  # noqa: E731
    rng = StackedRandomGenerator(torch.device("cpu"), image_seeds(0, 0, 200))
    z = rng.randn(torch.empty(200, 2, dtype=torch.float64))
    exact = gmm.flow_map(z * 80, 80.0)
    err = [(EDMTeacher().sample(exact_model, z, n, randn=rng.randn) - exact).norm(dim=1).mean().item()
           for n in (18, 40, 80)]
    assert err[0] > err[1] > err[2]
    assert err[2] < 2e-3  # measured 1.8e-2, 3.0e-3, 6.9e-4: solver error only, no network error


def test_as_teacher_is_frozen_and_speaks_every_convention():
    model = EDMDenoiser(ConstantNet(0.3))
    teacher = EDMTeacher().as_teacher(model)
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.randn(5, 2)
    t = torch.full((5,), 0.7)
    assert torch.allclose(teacher.velocity_trigflow(x, t), velocity_trigflow(lambda a, s: model(a, s), x, t))

"""Heun sampler and Karras grid against closed forms on a single Gaussian (exact PF-ODE solution known)."""

import pytest
import torch

from core.ode import euler_step, heun_sample, heun_step
from core.schedules import karras_sigmas, lognormal_sigma

MU, S = 0.3, 0.2


def denoise(x, sigma):  # exact E[x0 | x] for x0 ~ N(MU, S^2)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_map(x, sigma_from, sigma_to):  # the PF-ODE keeps (x - MU) / sqrt(S^2 + sigma^2)
    return MU + (x - MU) * ((S**2 + sigma_to**2) / (S**2 + sigma_from**2)) ** 0.5


def test_karras_grid_formula():
    s = karras_sigmas(18)
    assert s[0] == pytest.approx(80) and s[-1] == pytest.approx(0.002) and len(s) == 18
    assert torch.all(s[1:] < s[:-1])
    i = 5
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(expected, rel=1e-12)
    assert karras_sigmas(1).tolist() == [80.0]
    with pytest.raises(ValueError):
        karras_sigmas(0)


def test_lognormal_sigma_moments():
    torch.manual_seed(0)
    s = lognormal_sigma(200_000, -1.2, 1.2)
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.01)


def test_heun_is_second_order_and_converges():
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None] * 80
    exact = exact_map(x, 80.0, 0.0)
    errors = [(heun_sample(denoise, x, karras_sigmas(n)) - exact).abs().max().item() for n in (32, 64, 128)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3  # measured: 1.2e-2, 2.8e-3, 6.6e-4 for 32, 64, 128 steps
    # doubling the steps shrinks the error about 4x: second order
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5


def test_steps_and_euler_at_zero():
    x = torch.randn(4, 2, dtype=torch.float64)
    sig = torch.full((4,), 1.0, dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    assert torch.allclose(heun_step(denoise, x, sig, zero), euler_step(denoise, x, sig, zero))
    assert torch.allclose(euler_step(denoise, x, sig, zero), denoise(x, 1.0))  # a jump to 0 is the denoiser

"""Multistep consistency sampling: the schedule rule and Algorithm 1 of Song et al. 2023 with a known f."""

import pytest
import torch

from core.samplers import consistency_multistep, multistep_sigmas
from core.schedules import karras_sigmas


def test_schedule_rule():
    assert multistep_sigmas(1, [0.821]) == [80.0]
    assert multistep_sigmas(2, [0.821]) == [80.0, 0.821]
    four = multistep_sigmas(4, [0.821])  # list too short: interior of a 5-point Karras grid
    assert four == pytest.approx([80.0, *karras_sigmas(5)[1:-1].tolist()])
    with pytest.raises(ValueError, match="descend"):
        multistep_sigmas(2, [90.0])
    with pytest.raises(ValueError):
        multistep_sigmas(0, [])


def test_algorithm_with_a_known_f():
    """f(x, sigma) = x / (1 + sigma): each step must feed x0 + sqrt(sigma^2 - sigma_min^2) eps to f."""
    f = lambda x, s: x / (1 + s[:, None])  # noqa: E731
    z = torch.randn(5, 2)
    eps = [torch.randn(5, 2) for _ in range(2)]
    draws = iter(eps)
    out = consistency_multistep(f, z, [80.0, 2.0, 0.5], lambda like: next(draws))
    x0 = (80 * z) / 81
    x0 = (x0 + (4 - 0.002**2) ** 0.5 * eps[0]) / 3
    x0 = (x0 + (0.25 - 0.002**2) ** 0.5 * eps[1]) / 1.5
    assert torch.allclose(out, x0)

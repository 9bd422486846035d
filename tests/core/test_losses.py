"""The consistency distances against their formulas, with iCT's one rule for the pseudo-Huber constant."""

import math

import pytest
import torch

from core.losses import consistency_distance, ict_huber_c, mean_squared, pseudo_huber


def test_distances_match_their_formulas():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, 4, generator=gen), torch.randn(5, 3, 4, 4, generator=gen)
    diff = (a - b).flatten(1)
    assert torch.allclose(mean_squared(a, b), diff.square().mean(1))
    c = 0.00054 * math.sqrt(48)  # D = 3 * 4 * 4
    assert ict_huber_c(48) == c
    assert torch.allclose(pseudo_huber(a, b), (diff.square().sum(1) + c**2).sqrt() - c)
    assert torch.allclose(pseudo_huber(a, b, 0.06), (diff.square().sum(1) + 0.06**2).sqrt() - 0.06)
    assert torch.allclose(pseudo_huber(a, b, 0.0), diff.norm(dim=1))  # c = 0: the L2 norm (ECT on CIFAR-10)
    assert torch.equal(pseudo_huber(a, a), torch.zeros(5))
    assert torch.equal(consistency_distance(a, b, "l2"), mean_squared(a, b))
    assert torch.equal(consistency_distance(a, b, "pseudo_huber", 0.1), pseudo_huber(a, b, 0.1))
    with pytest.raises(ValueError, match="distance must be"):
        consistency_distance(a, b, "lpips")


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    """sqrt(r^2 + c^2) - c ~ r^2 / (2c) for r << c and ~ r - c for r >> c: Huber's two regimes."""
    c, zero = 0.5, torch.zeros(1, 4, dtype=torch.float64)
    small, large = torch.full_like(zero, 1e-3), torch.full_like(zero, 1e3)
    r_small, r_large = 2e-3, 2e3  # the L2 norms of the two differences
    assert pseudo_huber(small, zero, c).item() == pytest.approx(r_small**2 / (2 * c), rel=1e-4)
    assert pseudo_huber(large, zero, c).item() == pytest.approx(r_large - c, rel=1e-6)


def test_low_precision_outputs_are_compared_in_float32_and_float64_stays_float64():
    a, b = torch.randn(3, 8).bfloat16(), torch.randn(3, 8).bfloat16()
    assert pseudo_huber(a, b).dtype == mean_squared(a, b).dtype == torch.float32
    assert pseudo_huber(a.double(), b.double()).dtype == torch.float64

"""common.metrics.analytic on samples of a known mixture."""

import math

import pytest
import torch

from common.metrics.analytic import (
    energy_distance,
    flow_map_error,
    mode_coverage,
    mode_weight_tv,
    mode_weights,
    nll,
    off_mode_share,
)
from core.gmm import GaussianMixture

F64 = torch.float64


def ring8(shift=0.0) -> GaussianMixture:
    ang = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    means = torch.stack([0.7 * ang.cos(), 0.7 * ang.sin()], 1) + shift
    return GaussianMixture(means, [0.05] * 8, [1 / 8] * 8)


def quick_track() -> GaussianMixture:
    """config/config.yaml's gmm: 8 modes of std 0.08 on a ring of radius 0.7, weights 0.05 to 0.2."""
    ang = torch.arange(8, dtype=F64) * 2 * math.pi / 8
    means = torch.stack([0.7 * ang.cos(), 0.7 * ang.sin()], 1)
    return GaussianMixture(means, [0.08] * 8, [0.2, 0.1, 0.15, 0.05, 0.2, 0.1, 0.15, 0.05])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_nll_of_true_samples_is_the_entropy():
    """n = 20000: the MC standard error of the NLL is about 0.007 nats; asserted within 0.05."""
    g = ring8()
    entropy, se = g.entropy()
    x = g.sample(20_000, generator=gen(1))
    assert abs(nll(x, g) - entropy) < 0.05
    # a blurred sampler scores worse, and far outliers stay finite
    assert nll(x + 0.1 * torch.randn(x.shape, generator=gen(2)), g) > entropy + 0.5
    assert math.isfinite(nll(torch.tensor([[1e6, -1e6]]), g))


def test_energy_distance_noise_floor_and_shift():
    """Two independent 5000-point samples of ring8: over 40 seeds the estimate had mean -3e-6, std 2e-4 and
    |max| 5e-4, so |ED| < 1e-3 is asserted.  Shifting the mixture by 0.1 in both coordinates gives about
    0.03."""
    g = ring8()
    x, y = g.sample(5000, generator=gen(3)), g.sample(5000, generator=gen(4))
    assert abs(energy_distance(x, y)) < 1e-3
    z = ring8(shift=0.1).sample(5000, generator=gen(5))
    assert energy_distance(x, z) > 0.01


def test_energy_distance_closed_form_for_point_masses():
    """Two point masses a distance d apart: 2 d - 0 - 0."""
    x = torch.zeros(10, 2)
    y = torch.full((7, 2), 3.0)
    assert energy_distance(x, y) == pytest.approx(2 * 3 * math.sqrt(2), rel=1e-12)


def test_energy_distance_subsampling_is_seeded():
    g = ring8()
    x, y = g.sample(3000, generator=gen(6)), g.sample(3000, generator=gen(7))
    a = energy_distance(x, y, max_points=500, seed=1)
    assert a == energy_distance(x, y, max_points=500, seed=1)
    assert a != energy_distance(x, y, max_points=500, seed=2)


def test_mode_coverage():
    g = ring8()
    x, comp = g.sample(10_000, generator=gen(8), return_components=True)
    full = mode_coverage(x, g)
    assert full["modes_covered"] == 8 and full["mode_coverage"] == 1.0
    assert full["outlier_fraction"] < 0.02  # P(|z| > 3) in 2-D is exp(-4.5) = 0.011
    half = mode_coverage(x[comp < 4], g)
    assert half["modes_covered"] == 4 and half["mode_coverage"] == 0.5
    collapsed = mode_coverage(torch.zeros(100, 2), g)
    assert collapsed == {"modes_covered": 0, "mode_coverage": 0.0, "outlier_fraction": 1.0}


def test_mode_weights_of_separated_components_are_the_weights():
    g = quick_track()  # adjacent means 6.7 stds apart: a MAP assignment is almost never wrong
    w = mode_weights(g.sample(20_000, generator=gen(20)), g)
    assert w.shape == (8,) and w.sum().item() == pytest.approx(1.0)
    assert (w - g.weights).abs().max() < 0.01  # binomial std at most 0.003
    assert mode_weights(torch.zeros(10, 2) + g.means[2], g).tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_true_samples_score_the_floors():
    """Two independent true samples of N = 10000.  TV of two multinomial histograms has expectation
    sum_k sqrt(p_k (1 - p_k) / (pi N)) = 0.0144 here (normal approximation; over 40 seed pairs: mean 0.0144,
    std 0.0048, max 0.026): asserted below 2.5 times that.  The off-mode share of a true sample is the quantile
    in expectation (40 seed pairs: mean 0.0098, std 0.0014 at quantile 0.01): asserted within 0.005."""
    g = quick_track()
    n = 10_000
    x, ref = g.sample(n, generator=gen(21)), g.sample(n, generator=gen(22))
    bound = 2.5 * sum(math.sqrt(p * (1 - p) / (math.pi * n)) for p in g.weights.tolist())
    assert mode_weight_tv(x, g, ref) < bound
    assert mode_weight_tv(ref, g, ref) == 0.0
    assert abs(off_mode_share(x, g, ref) - 0.01) < 0.005
    assert abs(off_mode_share(x, g, ref, quantile=0.1) - 0.1) < 0.015


def test_mode_weight_tv_compares_with_true_samples_not_raw_weights():
    """Two components with one mean (stds 0.5 and 1.5): true points near the mean go to the narrow one, so the
    MAP histogram of a perfect sampler is not the weights (TV 0.105 from them) but matches fresh true samples
    (TV 0.010)."""
    g = GaussianMixture([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0]], [0.5, 1.5, 0.5], [0.4, 0.4, 0.2])
    x, ref = g.sample(10_000, generator=gen(23)), g.sample(10_000, generator=gen(24))
    assert 0.5 * (mode_weights(x, g) - g.weights).abs().sum() > 0.06
    assert mode_weight_tv(x, g, ref) < 0.02


def test_dropping_a_small_mode_scores_its_weight():
    """A sampler that never reaches component 3 (weight 0.05): TV = 0.05 exactly in expectation."""
    g = quick_track()
    x, comp = g.sample(20_000, generator=gen(25), return_components=True)
    dropped = x[comp != 3][:10_000]
    assert mode_weight_tv(dropped, g, g.sample(10_000, generator=gen(26))) == pytest.approx(0.05, abs=0.015)


def test_points_between_modes_are_off_mode():
    """30% of the points at midpoints between adjacent modes (5.4 stds from either): off-mode share
    0.3 + 0.7 * 0.01."""
    g = ring8()
    n, n_between = 10_000, 3_000
    midpoints = (g.means + g.means.roll(1, 0)) / 2
    between = midpoints[torch.randint(8, (n_between,), generator=gen(27))]
    between = between + 0.01 * torch.randn(n_between, 2, generator=gen(28), dtype=F64)
    x = torch.cat([g.sample(n - n_between, generator=gen(29)).double(), between])
    assert off_mode_share(x, g, g.sample(n, generator=gen(30))) == pytest.approx(0.307, abs=0.01)


def test_over_concentration_fools_nll_but_not_energy_distance_or_off_mode_share():
    """Every point pulled halfway to its mode's mean (stds x 0.5): the NLL falls 0.74 nats BELOW the entropy (in
    2-D by (1 - 0.5^2) D / 2 = 0.75), so a lower NLL is not a better sampler.  The energy distance rises to
    0.0015, 8x the real-vs-real |-0.0002|, and no sample is off-mode (0 vs the quantile 0.01: a departure in the
    other direction).  The mode histogram is blind to it (assignments unchanged)."""
    g = quick_track()
    n = 10_000
    x, comp = g.sample(n, generator=gen(31), return_components=True)
    shrunk = g.means[comp] + 0.5 * (x.double() - g.means[comp])
    ref, real = g.sample(n, generator=gen(32)), g.sample(n, generator=gen(33))
    entropy, _ = g.entropy()
    assert nll(shrunk, g) < entropy - 0.5 < nll(real, g) - 0.5
    assert energy_distance(shrunk, ref) > 1e-3 > 4 * abs(energy_distance(real, ref))
    assert off_mode_share(shrunk, g, ref) < 0.001 < 0.005 < off_mode_share(real, g, ref)
    assert mode_weight_tv(shrunk, g, ref) < 0.03


def test_flow_map_error():
    x = torch.randn(100, 2, generator=gen(9))
    assert flow_map_error(x, x.clone()) == {"mean": 0.0, "rms": 0.0, "max": 0.0}
    err = flow_map_error(x + torch.tensor([3.0, 4.0]), x)
    assert err["mean"] == pytest.approx(5.0, rel=1e-6) and err["max"] == pytest.approx(5.0, rel=1e-6)

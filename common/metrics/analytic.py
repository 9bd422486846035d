"""Exact metrics on Gaussian-mixture data (docs/evaluation.md): the true density is known, so sample
quality is measured against it rather than against a learned feature space."""

from __future__ import annotations

import torch

from core.gmm import GaussianMixture


def _points(x) -> torch.Tensor:
    """[N, ...] -> float64 [N, D] on CPU."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    return x.reshape(x.shape[0], -1)


def nll(samples, gmm: GaussianMixture) -> float:
    """-mean log p_true(samples) in nats; compare with gmm.entropy(), its floor for a perfect sampler.

    Finite for far outliers (the log density is a logsumexp of quadratics, never exp'd)."""
    return -gmm.log_prob(_points(samples)).mean().item()


def _mean_distance(a: torch.Tensor, b: torch.Tensor, within: bool, chunk: int = 1024) -> float:
    """Mean Euclidean distance over pairs; `within` (a is b): the U-statistic, excluding the zero diagonal."""
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        # no matmul trick: exact differences, so d(x, x) = 0 and small distances keep their precision
        total += torch.cdist(a[i:i + chunk], b, compute_mode="donot_use_mm_for_euclid_dist").sum().item()
    n, m = a.shape[0], b.shape[0]
    return total / (n * (n - 1)) if within else total / (n * m)


def energy_distance(x, y, max_points: int = 5000, seed: int = 0) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), unbiased: U-statistics for the within terms.

    Zero in expectation iff the distributions agree, so it may come out slightly negative.  Each set is
    subsampled to max_points with a fixed seed (the cost is quadratic); distances are computed in chunks."""
    x, y = _points(x), _points(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if min(x.shape[0], y.shape[0]) < 2:
        raise ValueError("energy_distance needs at least 2 points in each set")
    gen = torch.Generator().manual_seed(seed)
    if x.shape[0] > max_points:
        x = x[torch.randperm(x.shape[0], generator=gen)[:max_points]]
    if y.shape[0] > max_points:
        y = y[torch.randperm(y.shape[0], generator=gen)[:max_points]]
    return 2 * _mean_distance(x, y, False) - _mean_distance(x, x, True) - _mean_distance(y, y, True)


def mode_coverage(samples, gmm: GaussianMixture, radius_stds: float = 3.0, min_fraction: float = 0.1) -> dict:
    """Which components a sampler reaches: component k is covered when at least min_fraction * w_k * N samples
    lie within radius_stds * s_k of mu_k (full covariance: s_k = sqrt of Sigma_k's largest eigenvalue, so the
    ball holds the component's longest axis); outliers are samples within that radius of no mean."""
    x = _points(samples)
    n = x.shape[0]
    within = (torch.cdist(x, gmm.means, compute_mode="donot_use_mm_for_euclid_dist")
              <= radius_stds * gmm.component_scales)
    covered = within.sum(0) >= min_fraction * gmm.weights * n
    return {
        "modes_covered": int(covered.sum()),
        "mode_coverage": covered.double().mean().item(),
        "outlier_fraction": (~within.any(1)).double().mean().item() if n else 0.0,
    }


def mode_weights(samples, gmm: GaussianMixture) -> torch.Tensor:
    """Share of samples whose MAP component (argmax_k log w_k + log N_k(x)) is k, float64 [K].

    A sampler that under-covers a mode loses that mode's share, which NLL and energy distance dilute over all
    points; the MAP rule bins generated and true points alike, whatever the components' shapes."""
    x = _points(samples)
    comp = torch.cat([gmm.component_log_prob(c).argmax(1) for c in x.split(50_000)])  # bounded memory
    return torch.bincount(comp, minlength=gmm.num_components).double() / max(x.shape[0], 1)


def mode_weight_tv(samples, gmm: GaussianMixture, reference) -> float:
    """Total variation 1/2 sum_k |w_hat_k(samples) - w_hat_k(reference)| of the MAP-component histograms.

    `reference`: fresh true samples of the same size.  Against their histogram, not the raw weights w_k, because
    where components overlap a perfect sampler's MAP histogram differs from w_k (a point of the broad component
    near a narrow one is assigned to the narrow one), so raw weights would give it a nonzero score; with a
    reference of the same N, real-vs-real at that N is also exactly this statistic's floor.  Dropping a mode of
    weight w scores about w; over-concentrated modes keep their assignments and score ~0 (see off_mode_share)."""
    return 0.5 * (mode_weights(samples, gmm) - mode_weights(reference, gmm)).abs().sum().item()


def off_mode_share(samples, gmm: GaussianMixture, reference, quantile: float = 0.01) -> float:
    """Share of samples with log p_true below the `quantile` quantile of log p_true over `reference` (true samples).

    A perfect sampler scores `quantile` in expectation in any dimension and for any mixture, where a fixed
    threshold (log p < c) does not transfer; above it: mass between or beyond the modes; well below it: samples
    over-concentrated on the modes (the case where NLL drops below the entropy)."""
    threshold = torch.quantile(gmm.log_prob(_points(reference)), quantile)
    return (gmm.log_prob(_points(samples)) < threshold).double().mean().item()


def flow_map_error(x_pred, x_exact) -> dict:
    """Per-sample L2 error ||f_theta(x, t) - Phi_{t->0}(x)|| summarized as mean, root mean square and max."""
    err = (_points(x_pred) - _points(x_exact)).norm(dim=1)
    return {"mean": err.mean().item(), "rms": err.square().mean().sqrt().item(), "max": err.max().item()}

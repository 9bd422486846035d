"""Gaussian mixtures drawn from seeds: data nobody tuned for (docs/methods.md, "The analytic mixture").

The benchmark's own mixture is a hand-made isotropic ring, and every hyperparameter was chosen on it.  A method
that only works there is tuned to it, so `mixture_spec(seed)` draws other mixtures with the features that break
samplers: uneven weights with a small component (0.02-0.06), a far mode (2-3x the other means' spread), full
anisotropic covariances (random rotations, eigenvalue ratios up to 25), tight and broad components, in 2-D (most
often, so they can be plotted) up to 16-D.  Each mixture is then shifted and scaled to mean 0 and an RMS
per-coordinate std of 0.5 (EDM's sigma_data), so the noise schedule fits it as it fits the benchmark's data.

Hyperparameters may be chosen on the DEVELOPMENT_SEEDS mixtures; the HELD_OUT_SEEDS mixtures are only reported,
never used to choose anything, so their numbers say how a method does on data nobody tuned for.
"""

from __future__ import annotations

import numpy as np

DEVELOPMENT_SEEDS = tuple(range(0, 6))
HELD_OUT_SEEDS = tuple(range(1000, 1006))

DIMENSIONS = (2, 2, 4, 8, 16)  # seed % 5 picks one: 2-D two times in five
SMALL_WEIGHT = (0.02, 0.06)
FAR_FACTOR = (2.0, 3.0)  # far mode's distance from the other means' centroid / their RMS distance from it
MAX_EIGEN_RATIO = 25.0
DATA_STD = 0.5  # EDM's sigma_data


def mixture_set(seed: int) -> str | None:
    """'development' or 'held_out' for a suite seed; None for a seed in neither set (an ad hoc mixture)."""
    return "development" if seed in DEVELOPMENT_SEEDS else "held_out" if seed in HELD_OUT_SEEDS else None


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def mixture_spec(seed: int) -> dict:
    """A `GMMSpec` as plain lists, {"means": [K][D], "covs": [K][D][D], "weights": [K]}, drawn from
    numpy.random.default_rng(seed) (the dimension is DIMENSIONS[seed % 5], so the development and held-out
    sets hold the same dimensions); the same seed gives the same spec bitwise."""
    rng = np.random.default_rng(seed)
    d = DIMENSIONS[seed % len(DIMENSIONS)]  # not drawn: any 5 consecutive seeds hold every dimension
    k = int(rng.integers(3, 9))
    far, tight, broad = rng.permutation(k)[:3]  # distinct roles
    small = int(rng.integers(k))  # may coincide with any role (a small far mode is the hardest case)

    # weights: one small component, the others uneven (Dirichlet, concentration 0.7) above a floor of 0.03
    w_small = rng.uniform(*SMALL_WEIGHT)
    others = 0.03 + (1.0 - w_small - 0.03 * (k - 1)) * rng.dirichlet(np.full(k - 1, 0.7))
    weights = np.insert(others, small, w_small)

    # means: the near ones standard normal, the far one 2-3x their RMS spread away from their centroid
    means = rng.standard_normal((k, d))
    near = np.arange(k) != far
    centroid = means[near].mean(0)
    spread = np.sqrt(((means[near] - centroid) ** 2).sum(1).mean())
    direction = rng.standard_normal(d)
    means[far] = centroid + rng.uniform(*FAR_FACTOR) * spread * direction / np.linalg.norm(direction)

    # scales relative to the median nearest-neighbour distance L of the means (robust to one close pair):
    # tight 4-7 % of L, broad 25-35 %, the others in between
    dist = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1)) + np.diag(np.full(k, np.inf))
    length = np.median(dist.min(1))
    scales = length * np.exp(rng.uniform(np.log(0.07), np.log(0.25), k))
    scales[tight] = length * rng.uniform(0.04, 0.07)
    scales[broad] = length * rng.uniform(0.25, 0.35)

    # anisotropy: eigenvalue ratio R_k in [1.5, 25] (one component exactly 25), log-spread around scale^2
    ratios = np.exp(rng.uniform(np.log(1.5), np.log(MAX_EIGEN_RATIO), k))
    ratios[rng.integers(k)] = MAX_EIGEN_RATIO
    covs = np.empty((k, d, d))
    for i in range(k):
        logs = rng.uniform(-0.5, 0.5, d)
        logs[:2] = [-0.5, 0.5]  # the extremes are always present: the ratio is exactly R_k
        lam = scales[i] ** 2 * ratios[i] ** logs
        rot = _rotation(rng, d)
        covs[i] = (rot * lam) @ rot.T

    # mean 0, RMS per-coordinate std DATA_STD
    mean = weights @ means
    centered = means - mean
    total = (weights[:, None, None] * (covs + centered[:, :, None] * centered[:, None, :])).sum(0)
    c = DATA_STD / np.sqrt(np.trace(total) / d)
    means = c * centered
    covs = c**2 * covs
    covs = 0.5 * (covs + covs.transpose(0, 2, 1))  # exactly symmetric: IEEE addition commutes
    return {"means": means.tolist(), "covs": covs.tolist(), "weights": (weights / weights.sum()).tolist()}

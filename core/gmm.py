"""The analytic Gaussian mixture: exact density, score, denoiser and PF-ODE flow map (docs/methods.md).

Under the EDM forward process x = x0 + sigma eps an isotropic mixture sum_k w_k N(mu_k, s_k^2 I) stays a
mixture with variances v_k = s_k^2 + sigma^2, so every quantity the methods need is available in closed form:

    log p_sigma(x) = logsumexp_k [log w_k + log N(x; mu_k, v_k I)]
    score(x)       = sum_k r_k (mu_k - x) / v_k,          r_k = posterior of component k given x
    D(x, sigma)    = E[x0 | x] = sum_k r_k (mu_k + s_k^2 / v_k (x - mu_k))   (= x + sigma^2 score, Tweedie)

A full-covariance mixture (`covs=`: anisotropic data such as core.mixture_suite's) stays one with covariances
C_k = Sigma_k + sigma^2 I.  Each Sigma_k = U_k diag(lam_k) U_k^T is diagonalized once, so C_k^{-1} and log det C_k
are exact for every sigma: in y_k = U_k^T (x - mu_k) the formulas above hold per eigen-direction with
v_kj = lam_kj + sigma^2, and D = sum_k r_k (mu_k + U_k diag(lam_k / v_k) y_k).  The isotropic path is kept
separate and unchanged, so its numbers stay bitwise the same.

Everything is computed in float64 with logsumexp over components, so far-away points and sigma in [0, 80] are
stable.  The one thing without a closed form is the flow map Phi_{sigma -> sigma_end} of the PF-ODE, obtained
by a tight-tolerance ODE solve; it is the ground truth each consistency function is measured against.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .conventions import ConvertedTeacher

_F64 = torch.float64


class GaussianMixture:
    """Isotropic mixture sum_k w_k N(mu_k, s_k^2 I) (`stds`), or full-covariance sum_k w_k N(mu_k, Sigma_k)
    (`covs`, [K, D, D] symmetric positive definite; `stds` is then None); noised by the EDM forward process
    x = x0 + sigma eps it stays a mixture with covariances s_k^2 I + sigma^2 I, resp. Sigma_k + sigma^2 I."""

    def __init__(self, means, stds=None, weights=None, *, covs=None):
        if weights is None:
            raise ValueError("weights are required")
        if (stds is None) == (covs is None):
            raise ValueError("give exactly one of stds (isotropic) and covs (full covariance)")
        self.covs = None
        if covs is not None:
            self._init_full(means, covs, weights)
            return
        self.means = torch.as_tensor(means, dtype=_F64).cpu().reshape(len(stds), -1).clone()  # [K, D]
        self.stds = torch.as_tensor(stds, dtype=_F64).cpu().reshape(-1).clone()  # [K]
        self.weights = torch.as_tensor(weights, dtype=_F64).cpu().reshape(-1).clone()  # [K]
        k = self.stds.numel()
        if self.means.shape[0] != k or self.weights.numel() != k:
            raise ValueError(f"means {tuple(self.means.shape)}, stds [{k}] and weights "
                             f"[{self.weights.numel()}] must have one row / entry per component")
        if (self.stds <= 0).any() or (self.weights <= 0).any():
            raise ValueError("stds and weights must all be > 0")
        self.weights = self.weights / self.weights.sum()
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _init_full(self, means, covs, weights):
        covs = torch.as_tensor(covs, dtype=_F64).cpu().clone()
        if covs.ndim != 3 or covs.shape[1] != covs.shape[2]:
            raise ValueError(f"covs must be [K, D, D], got {tuple(covs.shape)}")
        k, d = covs.shape[:2]
        self.means = torch.as_tensor(means, dtype=_F64).cpu().clone()
        self.weights = torch.as_tensor(weights, dtype=_F64).cpu().reshape(-1).clone()
        if self.means.numel() != k * d or self.weights.numel() != k:
            raise ValueError(f"means {tuple(self.means.shape)}, covs {tuple(covs.shape)} and weights "
                             f"[{self.weights.numel()}] must have one row / entry per component")
        self.means = self.means.reshape(k, d)
        scale = covs.abs().amax(dim=(1, 2), keepdim=True)
        if not ((covs - covs.mT).abs() <= 1e-10 * scale).all():
            raise ValueError("covs must be symmetric")
        self.covs = 0.5 * (covs + covs.mT)
        self.stds = None
        lam, u = torch.linalg.eigh(self.covs)  # ascending eigenvalues, orthonormal eigenvectors
        if not (lam > 0).all() or (self.weights <= 0).any():
            raise ValueError("covs must be positive definite and weights all > 0")
        self._eigvals, self._eigvecs = lam, u  # [K, D], [K, D, D]: Sigma_k = U_k diag(lam_k) U_k^T
        self._cov_sqrt = (u * lam.sqrt()[:, None, :]) @ u.mT  # symmetric square roots, for sampling
        self.weights = self.weights / self.weights.sum()
        self._on_device = {}

    @classmethod
    def from_spec(cls, spec) -> GaussianMixture:
        covs = getattr(spec, "covs", None)
        if covs is not None:
            return cls(spec.means, None, spec.weights, covs=covs)
        return cls(spec.means, spec.stds, spec.weights)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def component_scales(self) -> torch.Tensor:
        """Per-component length scale, float64 [K]: s_k (isotropic) or sqrt of Sigma_k's largest eigenvalue."""
        return self.stds if self.covs is None else self._eigvals[:, -1].sqrt()

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"

    # -----------------------------------------------------------------------------------------------
    # Internals: float64 on the input's device.

    def _params(self, device: torch.device):
        if device not in self._on_device:
            self._on_device[device] = (self.means.to(device), self.stds.to(device) ** 2,
                                       self.weights.log().to(device))
        return self._on_device[device]

    def _prepare(self, x: torch.Tensor, sigma):
        """x -> float64 [N, D]; sigma (scalar, [N] or [N, 1]) -> float64 sigma^2 of shape [1, 1] or [1, N]."""
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [N, {self.dim}], got {tuple(x.shape)}")
        device = x.device if x.device.type != "mps" else torch.device("cpu")  # mps has no float64
        x64 = x.to(device=device, dtype=_F64)
        sig = torch.as_tensor(sigma, dtype=_F64, device=device)  # a Python float must skip float32
        if sig.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma must be a scalar, [N] or [N, 1] with N = {x.shape[0]}, "
                             f"got {tuple(sig.shape)}")
        return x64, sig.reshape(1, -1) ** 2

    def _posterior(self, x64: torch.Tensor, sig2: torch.Tensor):
        """Per-component log terms log w_k + log N(x; mu_k, v_k I) [K, N] and the variances v_k [K, 1|N].

        Components on the first axis: reductions over a short last axis are ~10x slower on CPU, and the flow
        map's ODE solve evaluates this thousands of times."""
        if self.covs is not None:
            return self._posterior_full(x64, sig2)[:2]
        mu, s2, logw = self._params(x64.device)
        var = s2[:, None] + sig2
        # exact differences (no |x|^2 - 2 x.mu + |mu|^2 expansion), so far-away points keep their precision
        d2 = torch.cdist(mu, x64, compute_mode="donot_use_mm_for_euclid_dist").square()
        logn = logw[:, None] - 0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * d2 / var
        return logn, var

    def _params_full(self, device: torch.device):
        if device not in self._on_device:
            self._on_device[device] = (self.means.to(device), self._eigvals.to(device),
                                       self.weights.log().to(device), self._eigvecs.to(device))
        return self._on_device[device]

    def _posterior_full(self, x64: torch.Tensor, sig2: torch.Tensor):
        """Full covariance: log w_k + log N(x; mu_k, C_k) [K, N], the eigenvalues v_k = lam_k + sigma^2 of C_k
        [K, 1|N, D] and the eigen-coordinates y_k = U_k^T (x - mu_k) [K, N, D]."""
        mu, lam, logw, u = self._params_full(x64.device)
        y = (x64[None] - mu[:, None]) @ u  # exact differences first, then an orthogonal rotation
        var = lam[:, None, :] + sig2[..., None]
        logn = (logw[:, None] - 0.5 * torch.log(2 * math.pi * var).sum(-1)
                - 0.5 * (y.square() / var).sum(-1))
        return logn, var, y

    def _score64_full(self, x64: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
        logn, var, y = self._posterior_full(x64, sig2)
        z = torch.softmax(logn, dim=0)[..., None] * y / var  # r_k C_k^{-1} (x - mu_k) in eigen-coordinates
        return -(z @ self._params_full(x64.device)[3].mT).sum(0)

    def _score64(self, x64: torch.Tensor, sig2: torch.Tensor) -> torch.Tensor:
        if self.covs is not None:
            return self._score64_full(x64, sig2)
        logn, var = self._posterior(x64, sig2)
        r_over_v = torch.softmax(logn, dim=0) / var
        return r_over_v.T @ self._params(x64.device)[0] - x64 * r_over_v.sum(0)[:, None]

    # -----------------------------------------------------------------------------------------------
    # Closed forms

    def sample(self, n: int, generator: torch.Generator | None = None, return_components: bool = False):
        """n i.i.d. points, float32 [n, D] on CPU (and the int64 component ids if asked)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        if self.covs is not None:
            x = self.means[comp]
            for k in range(self.num_components):
                rows = (comp == k).nonzero().squeeze(1)
                x[rows] += eps[rows] @ self._cov_sqrt[k]  # Sigma_k^{1/2} eps (the square root is symmetric)
            x = x.float()
            return (x, comp) if return_components else x
        x = (self.means[comp] + self.stds[comp, None] * eps).float()
        return (x, comp) if return_components else x

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """Exact log density [N] of the sigma-noised mixture (differentiable)."""
        logn, _ = self._posterior(*self._prepare(x, sigma))
        return torch.logsumexp(logn, dim=0).to(device=x.device, dtype=x.dtype)

    def component_log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log w_k + log N_k(x) of the sigma-noised mixture, float64 [N, K]: which component a point belongs to."""
        logn, _ = self._posterior(*self._prepare(x, sigma))
        return logn.T

    def score(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """grad_x log p_sigma(x) = sum_k r_k (mu_k - x) / v_k (full covariance: sum_k r_k C_k^{-1} (mu_k - x))."""
        return self._score64(*self._prepare(x, sigma)).to(device=x.device, dtype=x.dtype)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x0 | x_sigma] = sum_k r_k (sigma^2/v_k mu_k + s_k^2/v_k x); a `conventions.Denoiser`.

        Full covariance: sum_k r_k (mu_k + Sigma_k C_k^{-1} (x - mu_k)), no x + sigma^2 score cancellation."""
        x64, sig2 = self._prepare(x, sigma)
        if self.covs is not None:
            logn, var, y = self._posterior_full(x64, sig2)
            mu, lam, _, u = self._params_full(x64.device)
            r = torch.softmax(logn, dim=0)
            out = r.T @ mu + ((r[..., None] * (lam[:, None, :] / var) * y) @ u.mT).sum(0)
            return out.to(device=x.device, dtype=x.dtype)
        logn, var = self._posterior(x64, sig2)
        r = torch.softmax(logn, dim=0)
        mu, s2, _ = self._params(x64.device)
        out = (r * sig2 / var).T @ mu + x64 * (r * s2[:, None] / var).sum(0)[:, None]
        return out.to(device=x.device, dtype=x.dtype)

    def teacher(self) -> ConvertedTeacher:
        """The exact teacher in every convention (replaces a trained teacher on the analytic track)."""
        return ConvertedTeacher(self.denoise, name="gmm_exact")

    def entropy(self, n: int = 200_000, seed: int = 0) -> tuple[float, float]:
        """Monte Carlo differential entropy -E log p(x) (nats) and its standard error (no closed form)."""
        x = self.sample(n, generator=torch.Generator().manual_seed(seed)).double()
        chunk = 50_000 if self.covs is None else max(1, 2**21 // (self.num_components * self.dim))
        nlp = torch.cat([-self.log_prob(c) for c in x.split(chunk)])  # bounded memory in higher D
        return nlp.mean().item(), (nlp.std() / math.sqrt(n)).item()

    # -----------------------------------------------------------------------------------------------
    # The flow map

    @torch.no_grad()
    def flow_map(self, x: torch.Tensor, sigma, sigma_end=0.0, rtol: float = 1e-10, atol: float = 1e-10,
                 chunk_size: int = 4096) -> torch.Tensor:
        """Phi_{sigma -> sigma_end}(x): the exact PF-ODE map (also forwards when sigma_end > sigma).

        Solves dx/dsigma = (x - D(x, sigma)) / sigma = -sigma score(x, sigma) (finite at sigma = 0 since all
        s_k, resp. all eigenvalues of Sigma_k, are > 0) with DOP853 in float64.  Per-sample sigma / sigma_end
        share one solve through the fraction time u in [0, 1]: sigma_i(u) = sigma_end_i + u (sigma_i -
        sigma_end_i), integrated from u = 1 to 0.

        solve_ivp controls the RMS of the scaled error over the whole state, which lets one point's error grow
        with sqrt(state size).  So points are solved in chunks and the tolerances are divided by
        sqrt(chunk state size): RMS <= 1 then bounds every component's local error by rtol |x| + atol.
        """
        x64, _ = self._prepare(x, 0.0)
        n = x64.shape[0]
        s0 = torch.as_tensor(sigma, dtype=_F64).cpu().reshape(-1)
        s1 = torch.as_tensor(sigma_end, dtype=_F64).cpu().reshape(-1)
        if s0.numel() not in (1, n) or s1.numel() not in (1, n):
            raise ValueError(f"sigma and sigma_end must be scalars or [N] with N = {n}")
        if (s0 < 0).any() or (s1 < 0).any():
            raise ValueError("sigma and sigma_end must be >= 0")
        s0, s1 = s0.expand(n).numpy(), s1.expand(n).numpy()
        x_np = x64.detach().cpu().numpy()
        out = np.empty_like(x_np)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny RHS calls: thread hand-offs cost more than they save
        try:
            for a in range(0, n, chunk_size):
                b = min(a + chunk_size, n)
                out[a:b] = self._solve_chunk(x_np[a:b], s0[a:b], s1[a:b], rtol, atol)
        finally:
            torch.set_num_threads(threads)
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    def _solve_chunk(self, x: np.ndarray, s0: np.ndarray, s1: np.ndarray, rtol: float, atol: float):
        m, d = x.shape
        if np.all(s0 == s1):
            return x.copy()
        span = torch.from_numpy(s0 - s1)[:, None]  # dsigma/du per point
        end = torch.from_numpy(s1)[:, None]

        def rhs(u, y):
            xs = torch.from_numpy(y).reshape(m, d)
            sig = end + float(u) * span
            return (-(sig * span) * self._score64(xs, sig.reshape(1, -1) ** 2)).reshape(-1).numpy()

        scale = 1.0 / math.sqrt(m * d)
        floor = 100 * np.finfo(np.float64).eps  # solve_ivp refuses a smaller rtol
        sol = solve_ivp(rhs, (1.0, 0.0), x.reshape(-1), method="DOP853", rtol=max(rtol * scale, floor),
                        atol=atol * scale, t_eval=[0.0])
        if not sol.success:
            raise RuntimeError(f"flow_map ODE solve failed: {sol.message}")
        return sol.y[:, -1].reshape(m, d)

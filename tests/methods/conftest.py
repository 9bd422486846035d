"""Ground truth for method tests: a small 2-D mixture, its exact flow map, and a quickly trained EDM teacher.

Tests of a method train it for a few hundred steps on the mixture (with the exact analytic teacher for
distillation, and the trained teacher's weights where the paper starts from the teacher) and compare its
samples with the exact consistency function Phi_{sigma_max -> 0}.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from common.config import Config, from_dict, resolve_run, with_overrides
from common.models import load_trained
from common.sample import StackedRandomGenerator, image_seeds
from common.train import train
from core.gmm import GaussianMixture

GMM = {"means": [[0.6, 0.0], [0.0, 0.6], [-0.6, 0.0], [0.0, -0.6]], "stds": [0.1, 0.1, 0.1, 0.1],
       "weights": [0.4, 0.2, 0.3, 0.1]}
BASE = {
    "datasets": {"pts": {
        "data": {"kind": "gmm", "n_train": 8192, "gmm": GMM},
        "network": {"kind": "mlp", "hidden": 64, "depth": 2},
        "train": {"iterations": 1500, "batch_size": 512, "lr": 2e-3, "ema_halflife_kimg": 20, "log_every": 100,
                  "checkpoint_every": 100_000, "device": "cpu"},
        "eval": {"n_samples": 2000, "steps": [1, 2]},
    }},
}


def make_run(method: str, params: dict | None = None, train: dict | None = None, network: dict | None = None,
             seed: int = 0):
    """A resolved RunConfig of `method` on the test mixture, with overrides."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    data["methods"] = {method: {"params": params or {}, "train": train or {}, "network": network or {}}}
    return resolve_run(from_dict(Config, data, "", "tests"), "pts", method, seed, source="tests")


@pytest.fixture(scope="session")
def gmm() -> GaussianMixture:
    return GaussianMixture(GMM["means"], GMM["stds"], GMM["weights"])


@pytest.fixture(scope="session")
def gmm_teacher_dir(tmp_path_factory) -> Path:
    """An EDM teacher on the test mixture (about 10 s on 2 CPU cores); methods that start from the teacher use it."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(make_run("teacher"), out, progress_bar=False, log=lambda m: None)
    return out


def train_method(run, out: Path, teacher_dir: Path | None = None):
    """Train and return (method, EMA model)."""
    train(run, out, teacher_dir=str(teacher_dir) if teacher_dir else None, progress_bar=False, log=lambda m: None)
    _, method, model, _ = load_trained(out, torch.device("cpu"))
    return method, model


def latents(n: int = 2000, seed: int = 0):
    rng = StackedRandomGenerator(torch.device("cpu"), image_seeds(seed, 0, n))
    return rng.randn(torch.empty(n, 2)), rng


@torch.no_grad()
def sample_error(method, model, gmm: GaussianMixture, steps: int, n: int = 2000) -> dict:
    """Samples at `steps` vs the exact flow map of the same latents, plus energy distance and NLL."""
    from common.metrics.analytic import energy_distance, nll

    z, rng = latents(n)
    x = method.sample(model, z, steps, randn=rng.randn).double()
    exact = gmm.flow_map(z.double() * method.start_sigma, method.start_sigma)
    fresh = gmm.sample(n, generator=torch.Generator().manual_seed(123))
    return {"flow_map_error": (x - exact).norm(dim=1).mean().item(), "energy_distance": energy_distance(x, fresh),
            "nll": nll(x, gmm)}


__all__ = ["make_run", "train_method", "sample_error", "latents", "with_overrides"]

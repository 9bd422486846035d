"""How much of the teacher's error on gmm is the Heun solver's and how much the network's.

Runs EDM's Heun sampler with the exact mixture denoiser in place of a network, on the same latents the workflow
uses (sample seed 0, per-image seeds), and scores it like `cmbench evaluate` does.  Usage:

    python benchmarks/gmm_exact_teacher.py --config config/config.yaml --dataset gmm --n 10000
"""

import argparse
import json

import torch

from common.config import load_config
from common.metrics.analytic import energy_distance, flow_map_error, nll
from common.sample import StackedRandomGenerator, image_seeds
from core.gmm import GaussianMixture
from methods.teacher import EDMTeacher


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--dataset", default="gmm")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 18, 40])
    args = p.parse_args()
    gmm = GaussianMixture.from_spec(load_config(args.config).datasets[args.dataset].data.gmm)
    rng = StackedRandomGenerator(torch.device("cpu"), image_seeds(0, 0, args.n))
    z = rng.randn(torch.empty(args.n, gmm.dim, dtype=torch.float64))
    exact = gmm.flow_map(z * 80, 80.0)
    fresh = gmm.sample(args.n, generator=torch.Generator().manual_seed(2**31 - 1))
    model = lambda x, sigma, labels=None: gmm.denoise(x, sigma)  # noqa: E731
    print(f"entropy {gmm.entropy(seed=0)[0]:.4f}; NLL of the exact flow map's samples {nll(exact, gmm):.4f}")
    for steps in args.steps:
        x = EDMTeacher().sample(model, z, steps, randn=rng.randn)
        row = {"steps": steps, "nfe": 2 * steps - 1, "nll": nll(x, gmm), "energy_distance": energy_distance(x, fresh),
               "flow_map_error_mean": flow_map_error(x, exact)["mean"]}
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()

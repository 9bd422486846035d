"""A method on a mixture nobody tuned for, against the exact flow map: the check of the sCD review finding.

Trains the EDM teacher and the given methods through the project's own loop (`common.train.train`) on a 2-D
five-component isotropic mixture (`REVIEW_GMM`: a broad central component, a small far one with 5% of the
weight, three tight ones; overall std about 0.5 per axis), with everything else as `config/config.yaml`'s gmm
dataset (MLP 128 x 3, batch 1024, the quick-track budgets, teacher-initialized students, the exact mixture as
the distilled teacher).  Then, at 1 / 2 / 4 sampler steps, on the same latents (per-image seeds):

- flow-map error: mean L2 distance between the sample and the exact PF-ODE map Phi_{80 -> 0} of its latent
  (1 step is the consistency function itself; more steps re-noise, so the error there mixes in the sampler's noise)
- energy distance to fresh mixture samples
- outliers: the share of samples whose true log density is below the 1% quantile of true samples' log density
  (1% for a perfect sampler), and the share with log p < -5 (the review's measure)

Usage (on 1 thread: the teacher about 5 minutes, once per --out; then 1.5-2.5 minutes per method):

    OMP_NUM_THREADS=1 python benchmarks/exact_teacher.py --methods sct scd --out /tmp/exact_teacher
    ... --methods scd --params scd adaptive_weighting=true   (method-parameter overrides: here the paper's loss)
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:  # run as a script: the folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # profile.py would shadow the standard library's

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from common.config import config_from_data, resolve_run, with_overrides  # noqa: E402
from common.metrics.analytic import energy_distance  # noqa: E402
from common.models import load_trained  # noqa: E402
from common.sample import StackedRandomGenerator, image_seeds  # noqa: E402
from common.train import train  # noqa: E402
from core.gmm import GaussianMixture  # noqa: E402

HERE = Path(__file__).resolve().parent
REVIEW_GMM = {  # a broad central mode, a small far mode (5%), three tight modes; std about 0.51 / 0.50 per axis
    "means": [[0.0, 0.0], [1.3, -1.0], [-0.55, 0.55], [0.6, 0.5], [-0.35, -0.65]],
    "stds": [0.3, 0.08, 0.03, 0.04, 0.03],
    "weights": [0.45, 0.05, 0.2, 0.15, 0.15],
}


def review_config(config_path: str | Path, dataset: str = "gmm") -> dict:
    """config.yaml's data, with `dataset`'s mixture replaced by REVIEW_GMM (n_train, seed, budgets kept)."""
    data = yaml.safe_load(Path(config_path).read_text())
    data = copy.deepcopy(data)
    data["datasets"] = {dataset: data["datasets"][dataset]}
    data["datasets"][dataset]["data"]["gmm"] = copy.deepcopy(REVIEW_GMM)
    return data


def _parse_params(items: list[str]) -> dict[str, dict]:
    """["scd", "k=v", "k2=v2", "sct", "k=v"] -> {"scd": {k: v, k2: v2}, "sct": {k: v}} (values as YAML)."""
    out, current = {}, None
    for item in items:
        if "=" not in item:
            current = out.setdefault(item, {})
            continue
        if current is None:
            raise SystemExit(f"--params: name a method before {item}")
        key, value = item.split("=", 1)
        current[key] = yaml.safe_load(value)
    return out


@torch.no_grad()
def evaluate(method, model, gmm: GaussianMixture, steps_list, n: int, exact, z, ref_logp_q01, fresh) -> list[dict]:
    rows = []
    for steps in steps_list:
        rng = StackedRandomGenerator(torch.device("cpu"), image_seeds(0, 0, n))
        rng.randn(torch.empty(n, gmm.dim))  # the latents z: the same draws as `z`, then the sampler's noise
        x = method.sample(model, z, steps, randn=rng.randn).double()
        logp = gmm.log_prob(x)
        rows.append({"steps": steps, "flow_map_error": (x - exact).norm(dim=1).mean().item(),
                     "energy_distance": energy_distance(x, fresh),
                     "below_q01": (logp < ref_logp_q01).double().mean().item(),
                     "logp_below_-5": (logp < -5).double().mean().item()})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE.parent / "config/config.yaml"))
    p.add_argument("--dataset", default="gmm")
    p.add_argument("--methods", nargs="+", default=["sct", "scd"])
    p.add_argument("--params", nargs="*", default=[], help="METHOD k=v ... : method-parameter overrides")
    p.add_argument("--iterations", type=int, default=None, help="override every method's iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=5000, help="evaluation samples")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[18], help="Heun steps of the teacher's rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/cmbench_exact_teacher")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = _parse_params(args.params)

    data = review_config(args.config, args.dataset)
    config = config_from_data(data, "exact_teacher")
    gmm = GaussianMixture(REVIEW_GMM["means"], REVIEW_GMM["stds"], REVIEW_GMM["weights"])
    out = Path(args.out)
    quiet = lambda *a, **k: None  # noqa: E731

    teacher_run = resolve_run(config, args.dataset, "teacher", args.seed, source="exact_teacher")
    teacher_dir = out / f"teacher-s{args.seed}"
    train(teacher_run, teacher_dir, progress_bar=False, log=quiet)

    n = args.n
    z = StackedRandomGenerator(torch.device("cpu"), image_seeds(0, 0, n)).randn(torch.empty(n, gmm.dim))
    exact = gmm.flow_map(z.double() * 80.0, 80.0)
    fresh = gmm.sample(n, generator=torch.Generator().manual_seed(2**31 - 1)).double()
    ref = gmm.sample(200_000, generator=torch.Generator().manual_seed(12345)).double()
    q01 = torch.quantile(gmm.log_prob(ref), 0.01).item()
    print(json.dumps({"gmm": REVIEW_GMM, "logp_q01": round(q01, 4),
                      "exact_flow_map_below_q01": (gmm.log_prob(exact.double()) < q01).double().mean().item()}))

    for name in ["teacher", *args.methods]:
        run = resolve_run(config, args.dataset, name, args.seed, source="exact_teacher")
        if name != "teacher":
            train_over = {"iterations": args.iterations} if args.iterations else {}
            run = with_overrides(run, {"method_params": overrides.get(name, {}), "train": train_over}, "",
                                 "exact_teacher")
            tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.get(name, {}).items()))
            run_dir = out / f"{name}-s{args.seed}-it{run.train.iterations}{'-' + tag if tag else ''}"
            train(run, run_dir, teacher_dir=str(teacher_dir), progress_bar=False, log=quiet, archive_stale=True)
        else:
            run_dir = teacher_dir
        _, method, model, _ = load_trained(run_dir, torch.device("cpu"))
        steps = args.teacher_steps if name == "teacher" else args.steps
        for row in evaluate(method, model, gmm, steps, n, exact, z, q01, fresh):
            print(json.dumps({"method": name, "iterations": run.train.iterations,
                              **{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}}))


if __name__ == "__main__":
    main()

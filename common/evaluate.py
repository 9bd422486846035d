"""Score a samples file: exact metrics on gmm, FD-CNN on images; the protocol goes into every result.

A samples file (common/records.py) carries `samples`, `latents` and a JSON `meta` with the run's resolved config,
so evaluation needs nothing but the file and a cache folder for the FD-CNN classifier.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from core.errors import DataError
from core.mixture_suite import mixture_set

from .config import RunConfig, from_dict
from .data import load_dataset, load_prepared
from .records import read_samples

GMM_REFERENCE_SEED = 2**31 - 1  # fresh "real" points for the energy distance; never a training seed
OFF_MODE_QUANTILE = 0.01  # off_mode_share: a perfect sampler's score (docs/evaluation.md)


def evaluate(samples_path: str | Path, cache_dir: str | Path = "data/cache", device=None, log=print,
             data_path: str | Path | None = None, feature_net: str | Path | None = None,
             inception_ref: str | Path | None = None, features_dir: str | Path | None = None) -> dict:
    """`data_path`: the prepared dataset (else read from its source); `feature_net`: FD-CNN weights (else cached);
    `inception_ref`: a file from `cmbench inception-ref`, which turns on Inception FID from both libraries;
    `features_dir`: where Inception features are cached shard by shard, so a killed evaluation resumes (the
    CLI's `<out>.features`, removed once the metrics file is written; None: a temporary folder)."""
    samples, latents, meta = read_samples(samples_path)
    run = from_dict(RunConfig, meta["run"], "meta.run", str(samples_path))
    device = device or torch.device("cpu")
    x = torch.from_numpy(samples)
    if run.data.kind == "gmm":
        dim = len(run.data.gmm.means[0])
        if x.ndim != 2 or x.shape[1] != dim:
            raise DataError(f"{samples_path}: samples have shape {tuple(x.shape)} but {run.dataset} points are "
                            f"[N, {dim}]; sample from a run of this dataset")
        if inception_ref is not None:
            raise DataError(f"{samples_path}: Inception FID is for images; {run.dataset} holds points")
        metrics, extra = _gmm_metrics(run, x, latents, meta), {}
    else:
        metrics, extra = _image_metrics(run, x, cache_dir, device, log, data_path, feature_net, inception_ref,
                                        features_dir)
    return {"dataset": run.dataset, "method": run.method, "seed": run.seed, "steps": meta["steps"],
            "nfe": meta["nfe"], "sample_seed": meta["sample_seed"], "n_samples": len(samples),
            "weights": meta["weights"], "metrics": metrics, "protocol": {**_protocol(run, len(samples)), **extra},
            "compute": meta.get("compute", {})}


def _gmm_metrics(run: RunConfig, x: torch.Tensor, latents, meta) -> dict:
    from core.gmm import GaussianMixture

    from .metrics.analytic import energy_distance, flow_map_error, mode_coverage, mode_weight_tv, nll, off_mode_share

    gmm = GaussianMixture.from_spec(run.data.gmm)
    fresh = gmm.sample(len(x), generator=torch.Generator().manual_seed(GMM_REFERENCE_SEED))
    fresh2 = gmm.sample(len(x), generator=torch.Generator().manual_seed(GMM_REFERENCE_SEED - 1))
    entropy, entropy_se = gmm.entropy(seed=0)
    nll_x = nll(x, gmm)
    metrics = {
        "nll": nll_x,
        "entropy": entropy,
        "entropy_se": entropy_se,
        "nll_gap": nll_x - entropy,  # 0 for a perfect sampler, < 0 when over-concentrated: never NLL alone
        "energy_distance": energy_distance(x, fresh),
        "energy_distance_real": energy_distance(fresh2, fresh),  # the floor at this N: real vs real
        "mode_weight_tv": mode_weight_tv(x, gmm, fresh),
        "mode_weight_tv_real": mode_weight_tv(fresh2, gmm, fresh),
        "off_mode_share": off_mode_share(x, gmm, fresh, OFF_MODE_QUANTILE),
        "off_mode_share_real": off_mode_share(fresh2, gmm, fresh, OFF_MODE_QUANTILE),
    }
    metrics.update(mode_coverage(x, gmm))
    if latents is not None:
        start_sigma = float(meta["start_sigma"])
        exact = gmm.flow_map(torch.from_numpy(latents).double() * start_sigma, start_sigma)
        metrics.update({f"flow_map_error_{k}": v for k, v in flow_map_error(x.double(), exact).items()})
    return metrics


def _image_metrics(run: RunConfig, x: torch.Tensor, cache_dir, device, log, data_path, feature_net,
                   inception_ref=None, features_dir=None) -> tuple[dict, dict]:
    """(metrics, protocol fields beyond FD-CNN's)."""
    from .metrics.fd_cnn import check_classifier, fd_cnn, load_or_train

    ds = load_prepared(data_path) if data_path else load_dataset(run.data)
    if tuple(x.shape[1:]) != ds.item_shape:
        raise DataError(f"samples have shape {tuple(x.shape[1:])} but {run.dataset} items are {ds.item_shape}")
    if inception_ref is not None:  # every Inception check before any network runs
        from .metrics import inception_fid

        ref = inception_fid.load_reference(inception_ref)
        inception_weights = inception_fid.check_reference(ref, ds, len(x), cache_dir)
    if feature_net is not None:
        check_classifier(feature_net, ds, run.eval.fd_cnn)
        weights = feature_net
    else:
        weights = load_or_train(ds, run.eval.fd_cnn, cache_dir, device, log)
    reference, baseline, baseline_note = fd_cnn_real_sets(len(ds), run.eval.n_reference, len(x))
    ref_x = ds.rows(reference)  # only these rows: a memory-mapped split stays on disk
    metrics, extra = fd_cnn(x, ref_x, weights, device), {"fd_cnn_baseline": baseline_note}
    real_a, real_b = (ds.rows(baseline), ref_x) if len(baseline) else _halves(ds)
    metrics["fd_cnn_real"] = fd_cnn(real_a, real_b, weights, device, kid=False)["fd_cnn"]
    if inception_ref is not None:
        log(f"{inception_weights.label} at N = {ref.meta['n']}: torch-fidelity and clean-fid")
        with _folder(features_dir) as folder:
            inception_metrics, inception_protocol = inception_fid.score(x, ref, inception_weights, device, folder)
        metrics.update(inception_metrics)
        extra.update(inception_protocol)
    return metrics, extra


@contextlib.contextmanager
def _folder(path):
    """`path` itself (kept for a resumed attempt), or a temporary folder when none is given."""
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="cmbench-features-") as tmp:
        yield Path(tmp)


def fd_cnn_real_sets(n_data: int, n_reference: int | None, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(reference indices, baseline indices, description) for FD-CNN and its real-vs-real floor.

    The reference is the first `n_reference` images of a fixed permutation (all images if None); the baseline is
    the next n images, disjoint from it, so FD(baseline, reference) is the score of perfect samples at this N.
    When the data has no n images beyond the reference the baseline is two disjoint halves of the data instead,
    at a smaller N, and the description says so."""
    perm = torch.randperm(n_data, generator=torch.Generator().manual_seed(0))
    n_ref = n_data if n_reference is None else min(n_reference, n_data)
    reference = perm[:n_ref]
    if n_ref + n <= n_data:
        return reference, perm[n_ref: n_ref + n], f"{n} real images disjoint from the {n_ref} reference images"
    half = n_data // 2
    return reference, perm[:0], (f"two disjoint halves of the data ({half} vs {n_data - half} images): it has no "
                                 f"{n} images outside the {n_ref} reference images")


def _halves(ds) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    return ds.rows(perm[: len(ds) // 2]), ds.rows(perm[len(ds) // 2:])


def _protocol(run: RunConfig, n: int) -> dict:
    if run.data.kind == "gmm":
        suite = ({"mixture": run.data.mixture, "mixture_set": mixture_set(run.data.mixture)}
                 if run.data.mixture is not None else {})
        return {"metric_family": "exact (analytic mixture)", "n_samples": n, "off_mode_quantile": OFF_MODE_QUANTILE,
                **suite}
    import torch_fidelity

    return {"metric_family": f"FD-CNN({run.dataset})", "library": f"torch-fidelity {torch_fidelity.__version__}",
            "n_samples": n, "reference": f"{run.data.kind} {run.data.split} split"
            + (f", {run.eval.n_reference} images" if run.eval.n_reference else ", all images")}

"""Inception FID of a dataset's samples: reference statistics computed once, then both libraries per samples file.

The reference file (npz) holds, for torch-fidelity and for clean-fid, the mean and covariance of the Inception
features of `n` real images, and the real-vs-real FID of `n` other real images against them: the floor at this
N that every row prints beside its own value.  It also records what it was computed from (data hash, weights
sha256, n, seed, library versions), so a row can never mix a reference with other data or other weights.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import DataError

from ..config import InceptionSpec
from ..data import Dataset, data_hash, sha256_file, to_uint8_images
from ..fsutil import atomic_write
from . import inception, libraries

FORMAT_VERSION = 1


def library_versions() -> str:
    from importlib.metadata import version

    return (f"torch-fidelity {version('torch-fidelity')} ({inception.TORCH_FIDELITY_EXTRACTOR}, TF-1.x bilinear "
            f"resize in graph); clean-fid {version('clean-fid')} (mode clean, PIL bicubic resize)")


class Scorer:
    """One Inception network, run by both libraries on the same uint8 images."""

    def __init__(self, weights: inception.InceptionWeights, device: torch.device, batch_size: int):
        self.weights, self.device, self.batch_size = weights, device, batch_size
        self.net = inception.torch_fidelity_network(weights, device)
        self.clean_fid_fn = inception.clean_fid_network(self.net)

    def statistics(self, x: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
        """x in [-1, 1] -> {library: {"mu", "sigma"}}."""
        u8 = to_uint8_images(x)
        feats = {"torch_fidelity": libraries.torch_fidelity_features(u8, self.net, self.batch_size, self.device),
                 "clean_fid": libraries.clean_fid_features(u8, self.clean_fid_fn, self.batch_size, self.device)}
        return {lib: libraries.statistics(lib, f) for lib, f in feats.items()}


def split_real(ds: Dataset, spec: InceptionSpec, option: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random sets of n real images: the reference and the real-vs-real baseline set."""
    if 2 * spec.n > len(ds):
        raise DataError(f"{option}.n = {spec.n} needs 2 x {spec.n} real images (reference + baseline set) but the "
                        f"dataset has {len(ds)}; lower {option}.n")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(spec.seed))
    return ds.x[perm[: spec.n]], ds.x[perm[spec.n: 2 * spec.n]]


def build_reference(ds: Dataset, spec: InceptionSpec, option: str, out: str | Path, cache_dir: str | Path,
                    device: torch.device, log=print) -> dict:
    """Compute and write the reference file; every check (weights, sizes) runs before any network does."""
    weights = inception.resolve_weights(spec.weights, f"{option}.weights", cache_dir)
    ref_x, real_x = split_real(ds, spec, option)
    scorer = Scorer(weights, device, spec.batch_size)
    log(f"{weights.label}: features of {spec.n} reference images, then {spec.n} baseline images, both libraries")
    ref, real = scorer.statistics(ref_x), scorer.statistics(real_x)
    meta = {"format": FORMAT_VERSION, "data_sha256": data_hash(ds), "n": spec.n, "seed": spec.seed,
            "batch_size": spec.batch_size,
            "weights_label": weights.label, "weights_file": weights.source, "weights_sha256": weights.sha256,
            "libraries": library_versions(), "dataset_kind": ds.kind}
    for lib in libraries.LIBRARIES:
        meta[f"fid_{lib}_real"] = libraries.frechet(lib, real[lib], ref[lib])
    arrays = {f"{lib}_{k}": v for lib in libraries.LIBRARIES for k, v in ref[lib].items()}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(out, lambda f: f.write(buf.getvalue()))
    return meta


@dataclass
class Reference:
    path: Path
    sha256: str
    meta: dict
    stats: dict[str, dict[str, np.ndarray]]


def load_reference(path: str | Path) -> Reference:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Inception reference file not found: {path} (make it with `cmbench inception-ref`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            stats = {lib: {"mu": f[f"{lib}_mu"], "sigma": f[f"{lib}_sigma"]} for lib in libraries.LIBRARIES}
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{path} is not a cmbench Inception reference file: {e}; rebuild it with "
                        f"`cmbench inception-ref`") from None
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} has reference format {meta.get('format')}, this code writes {FORMAT_VERSION}; "
                        f"rebuild it with `cmbench inception-ref`")
    return Reference(path, sha256_file(path), meta, stats)


def check_reference(ref: Reference, ds: Dataset, n_samples: int, cache_dir: str | Path) -> inception.InceptionWeights:
    """Before any compute: the reference matches the data, there are enough samples, the weights are unchanged."""
    if ref.meta["data_sha256"] != data_hash(ds):
        raise DataError(f"Inception reference {ref.path} was computed on other data; rebuild it with "
                        f"`cmbench inception-ref`")
    if n_samples < ref.meta["n"]:
        raise DataError(f"Inception FID at N = {ref.meta['n']} needs that many samples, the samples file has "
                        f"{n_samples}; raise eval.n_samples or lower inception.n")
    setting = inception.OPT_IN if ref.meta["weights_label"] == inception.DEFAULT_1_LABEL else ref.meta["weights_file"]
    if setting != inception.OPT_IN and not Path(setting).is_file():  # another machine: $CMBENCH_INCEPTION_WEIGHTS
        setting = None
    weights = inception.resolve_weights(setting, f"the weights recorded in {ref.path}", cache_dir)
    if weights.sha256 != ref.meta["weights_sha256"]:
        raise DataError(f"{weights.source} changed since {ref.path} was computed; rebuild it with "
                        f"`cmbench inception-ref`")
    return weights


def score(samples: torch.Tensor, ref: Reference, weights: inception.InceptionWeights,
          device: torch.device) -> tuple[dict[str, float], dict]:
    """(metrics, protocol fields) for the first n samples against the reference, from both libraries."""
    n = ref.meta["n"]
    stats = Scorer(weights, device, ref.meta["batch_size"]).statistics(samples[:n])
    metrics = {}
    for lib in libraries.LIBRARIES:
        metrics[f"fid_{lib}"] = libraries.frechet(lib, stats[lib], ref.stats[lib])
        metrics[f"fid_{lib}_real"] = float(ref.meta[f"fid_{lib}_real"])  # the real-vs-real floor at this N
    protocol = {"inception_label": weights.label, "inception_weights_file": weights.source,
                "inception_weights_sha256": weights.sha256, "inception_n": n,
                "inception_reference_sha256": ref.sha256, "inception_libraries": ref.meta["libraries"],
                "inception_reference": f"{n} real images (seed {ref.meta['seed']}) of the prepared "
                f"{ref.meta['dataset_kind']} data; baseline: {n} other real images"}
    return metrics, protocol

"""Inception FID of a dataset's samples: reference statistics computed once, then both libraries per samples file.

The reference file (npz) holds, for torch-fidelity and for clean-fid, the mean and covariance of the Inception
features of the reference images (by default the whole train split, as EDM and the CM papers compute CIFAR-10
FID), and the real-vs-real FID of other real images against them (the test split, or training images outside
the reference): the floor every row prints beside its own value.  It also records what it was computed from
(data hashes, weights sha256, sizes, seed, library versions), so a row can never mix a reference with other data
or other weights.  Features are computed in shards cached beside the output, so a job killed at its time limit
resumes where it stopped (common/shards.py).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import DataError

from .. import shards
from ..config import InceptionSpec
from ..data import Dataset, data_hash, sha256_file, to_uint8_images
from ..eval_sizes import InceptionPlan, inception_plan
from ..fsutil import atomic_write
from ..progress import Progress
from . import inception, libraries

FORMAT_VERSION = 2  # 2: reference and floor chosen by n_reference / baseline / n_baseline (common/eval_sizes.py)
FEATURES = 2048  # Inception pool3


def library_versions() -> str:
    from importlib.metadata import version

    return (f"torch-fidelity {version('torch-fidelity')} ({inception.TORCH_FIDELITY_EXTRACTOR}, TF-1.x bilinear "
            f"resize in graph); clean-fid {version('clean-fid')} (mode clean, PIL bicubic resize)")


@dataclass
class Images:
    """n uint8 [C, H, W] images, read a shard at a time: a whole split never has to sit in memory twice."""

    n: int
    read: Callable[[int, int], torch.Tensor]  # (start, stop) -> uint8 [stop - start, C, H, W]

    @staticmethod
    def of_floats(x: torch.Tensor) -> Images:
        """Images in [-1, 1], e.g. a samples file's."""
        return Images(len(x), lambda lo, hi: to_uint8_images(x[lo:hi]))

    @staticmethod
    def of_dataset(ds: Dataset, index: torch.Tensor | None = None) -> Images:
        """Rows of a dataset (all, in order, if `index` is None), read and converted a shard at a time."""
        if index is None:  # `rows` reads only these rows: a memory-mapped split stays on disk
            return Images(len(ds), lambda lo, hi: to_uint8_images(ds.rows(torch.arange(lo, hi))))
        return Images(len(index), lambda lo, hi: to_uint8_images(ds.rows(index[lo:hi])))

    @staticmethod
    def of_uint8(u8: torch.Tensor) -> Images:
        return Images(len(u8), lambda lo, hi: u8[lo:hi])


def _images_sha256(u8: torch.Tensor) -> str:
    arr = u8.contiguous().numpy()
    return hashlib.sha256(f"{arr.dtype.str}:{list(arr.shape)}|".encode() + arr.tobytes()).hexdigest()


class Scorer:
    """One Inception network, run by both libraries on the same uint8 images, shard by shard."""

    def __init__(self, weights: inception.InceptionWeights, device: torch.device, batch_size: int):
        self.weights, self.device, self.batch_size = weights, device, batch_size
        self.net = inception.torch_fidelity_network(weights, device)
        clean_fid_fn = inception.clean_fid_network(self.net)
        self.progress: Progress | None = None
        self.net.register_forward_hook(lambda module, inputs, output: self._tick(len(inputs[0])))

        def counted(x: torch.Tensor) -> torch.Tensor:
            features = clean_fid_fn(x)
            self._tick(len(x))
            return features

        self.clean_fid_fn = counted
        # what a cached shard must share to be kept (its range and image hash are added per shard)
        self.key = {"format": 1, "weights_sha256": weights.sha256, "libraries": library_versions(),
                    "batch_size": batch_size, "device": device.type}

    def _tick(self, k: int) -> None:
        if self.progress is not None:
            self.progress.update(k / len(libraries.LIBRARIES))  # an image counts once both libraries saw it

    def _compute(self, u8: torch.Tensor) -> dict[str, np.ndarray]:
        return {"torch_fidelity": libraries.torch_fidelity_features(u8, self.net, self.batch_size, self.device),
                "clean_fid": libraries.clean_fid_features(u8, self.clean_fid_fn, self.batch_size, self.device)}

    def features(self, images: Images, folder: Path, desc: str) -> dict[str, np.ndarray]:
        """{library: [n, 2048] float32}, shard by shard; shards cached in `folder` by an earlier attempt with the
        same images, weights, libraries, batch size and device type are read instead of recomputed."""
        size = shards.shard_size(self.batch_size)
        parts = {lib: [] for lib in libraries.LIBRARIES}
        self.progress = progress = Progress(images.n, desc)  # the hooks tick it as batches pass
        try:
            for index, (lo, hi) in enumerate(shards.ranges(images.n, size)):
                u8 = images.read(lo, hi)
                key = {**self.key, "start": lo, "stop": hi, "images_sha256": _images_sha256(u8)}
                file = shards.path(folder, index)
                found = shards.read(file, key, {lib: (hi - lo, FEATURES) for lib in libraries.LIBRARIES})
                if found is not None:
                    arrays = found[0]
                    progress.skip(hi - lo)
                else:
                    arrays = self._compute(u8)
                    shards.write(file, arrays, key)
                for lib in libraries.LIBRARIES:
                    parts[lib].append(arrays[lib])
        finally:
            self.progress = None
            progress.close()
        return {lib: np.concatenate(parts[lib]) for lib in libraries.LIBRARIES}

    def statistics(self, images: Images, folder: Path, desc: str) -> dict[str, dict[str, np.ndarray]]:
        """{library: {"mu", "sigma"}} as each library computes them."""
        feats = self.features(images, folder, desc)
        return {lib: libraries.statistics(lib, f) for lib, f in feats.items()}


# ---------------------------------------------------------------------------------------------------
# The reference file


def real_sets(ds: Dataset, spec: InceptionSpec, option: str,
              test: Dataset | None = None) -> tuple[InceptionPlan, Images, Images]:
    """(plan, reference images, baseline images); every size check runs here, before any network does.

    A whole split is read in its own order; a subset is the start of a permutation seeded with `spec.seed`
    (the disjoint baseline: the images after the reference in that permutation)."""
    plan = inception_plan(spec, ds.kind, len(ds), None if test is None else len(test), option)
    if plan is None:  # a test-split baseline without the test split: a caller's bug, not the user's
        raise ValueError("real_sets needs the test split for a 'test_split' baseline")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(spec.seed))
    reference = Images.of_dataset(ds, None if plan.reference_is_split else perm[: plan.n_reference])
    if plan.baseline == "disjoint":
        baseline = Images.of_dataset(ds, perm[plan.n_reference: plan.n_reference + plan.n_baseline])
    elif plan.baseline_is_split:
        baseline = Images.of_dataset(test)
    else:
        test_perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(spec.seed))
        baseline = Images.of_dataset(test, test_perm[: plan.n_baseline])
    return plan, reference, baseline


def build_reference(ds: Dataset, spec: InceptionSpec, option: str, out: str | Path, cache_dir: str | Path,
                    device: torch.device, log=print, test: Dataset | None = None) -> dict:
    """Compute and write the reference file; every check (weights, sizes) runs before any network does.

    `test`: the test split, for a 'test_split' baseline.  Features are cached in `<out>.features/` until the
    file is written, so a killed job resumes; the folder is removed after."""
    weights = inception.resolve_weights(spec.weights, f"{option}.weights", cache_dir)
    plan, ref_images, real_images = real_sets(ds, spec, option, test)
    scorer = Scorer(weights, device, spec.batch_size)
    folder = shards.folder_beside(out, ".features")
    texts = {"reference_text": plan.reference_text(ds.kind, spec.seed),
             "baseline_text": plan.baseline_text(ds.kind, spec.seed)}
    log(f"{weights.label}: reference = {texts['reference_text']}; floor = {texts['baseline_text']}")
    ref = scorer.statistics(ref_images, folder / "reference", f"Inception features, reference ({ds.kind})")
    real = scorer.statistics(real_images, folder / "baseline", f"Inception features, baseline ({ds.kind})")
    meta = {"format": FORMAT_VERSION, "data_sha256": data_hash(ds), "n": spec.n, "seed": spec.seed,
            "n_reference": plan.n_reference, "baseline": plan.baseline, "n_baseline": plan.n_baseline,
            "baseline_data_sha256": data_hash(test) if plan.baseline == "test_split" else data_hash(ds),
            **texts, "batch_size": spec.batch_size,
            "weights_label": weights.label, "weights_file": weights.source, "weights_sha256": weights.sha256,
            "libraries": library_versions(), "dataset_kind": ds.kind}
    for lib in libraries.LIBRARIES:
        meta[f"fid_{lib}_real"] = libraries.frechet(lib, real[lib], ref[lib])
    arrays = {f"{lib}_{k}": v for lib in libraries.LIBRARIES for k, v in ref[lib].items()}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(out, lambda f: f.write(buf.getvalue()))
    shards.remove(folder)
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


def score(samples: torch.Tensor, ref: Reference, weights: inception.InceptionWeights, device: torch.device,
          folder: str | Path) -> tuple[dict[str, float], dict]:
    """(metrics, protocol fields) for the first n samples against the reference, from both libraries; features
    cached in `folder` until the caller is done (a killed evaluation resumes)."""
    n = ref.meta["n"]
    scorer = Scorer(weights, device, ref.meta["batch_size"])
    stats = scorer.statistics(Images.of_floats(samples[:n]), Path(folder), "Inception features, samples")
    metrics = {}
    for lib in libraries.LIBRARIES:
        metrics[f"fid_{lib}"] = libraries.frechet(lib, stats[lib], ref.stats[lib])
        metrics[f"fid_{lib}_real"] = float(ref.meta[f"fid_{lib}_real"])  # the real-vs-real floor
    protocol = {"inception_label": weights.label, "inception_weights_file": weights.source,
                "inception_weights_sha256": weights.sha256, "inception_n": n,
                "inception_reference_sha256": ref.sha256, "inception_libraries": ref.meta["libraries"],
                "inception_reference": ref.meta["reference_text"],
                "inception_baseline": ref.meta["baseline_text"]}
    return metrics, protocol

"""FID of any image set against given reference statistics, e.g. EDM's `cifar10-32x32.npz` or ADM's
`VIRTUAL_imagenet64_labeled.npz`: the check that our pipeline reproduces published numbers on published samples.

Sample sets: an npz with `arr_0` uint8 [N, H, W, C] (the EDM / ADM / CM sample dumps), a folder of PNG files
(searched recursively, in path order, as EDM's generate.py writes them), or a cmbench samples file.  Reference
statistics: an npz with `mu` [2048] and `sigma` [2048, 2048], used as is (only widened to float64).  Whoever
made that file chose its network and resize (EDM's and ADM's come from their own TF-Inception pipelines); our
side is always the harness's Inception (common/metrics/inception.py) through each library's own pipeline.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import DataError

from ..data import sha256_file
from . import inception, libraries
from .inception_fid import FEATURES, Images, Scorer, library_versions

_GRAY = {"1", "L", "LA"}


@dataclass
class SampleSet:
    path: Path
    images: torch.Tensor  # uint8 [N, C, H, W]
    format: str


@dataclass
class Statistics:
    path: Path
    sha256: str
    stats: dict[str, np.ndarray]  # mu, sigma as float64


def load_images(path: str | Path) -> SampleSet:
    """A sample set as uint8 [N, C, H, W]; anything else is a one-line error."""
    path = Path(path)
    images, fmt = _read_images(path)
    return SampleSet(path, images, fmt)


def _read_images(path: Path) -> tuple[torch.Tensor, str]:
    if path.is_dir():
        return _png_folder(path), "folder of PNG files"
    if not path.is_file():
        raise DataError(f"sample set not found: {path} (give an .npz with arr_0, a folder of PNGs, or a samples file)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if "arr_0" in keys:
                return _nhwc(f["arr_0"], path), "npz arr_0 (uint8 NHWC)"
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    if {"samples", "meta"} <= set(keys):
        from ..data import to_uint8_images
        from ..records import read_samples

        samples = read_samples(path)[0]
        if samples.ndim != 4:
            raise DataError(f"{path}: samples have shape {samples.shape}; FID is for images [N, C, H, W]")
        return to_uint8_images(torch.from_numpy(samples)), "cmbench samples file"
    raise DataError(f"{path} holds {', '.join(keys) or 'no arrays'}; a sample set needs arr_0 (uint8 [N, H, W, C]) "
                    f"or is a cmbench samples file")


def _nhwc(arr: np.ndarray, path: Path) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3) or len(arr) < 2:
        raise DataError(f"{path}: arr_0 is {arr.dtype} {list(arr.shape)}; expected uint8 [N >= 2, H, W, 1 or 3] "
                        f"(EDM/ADM sample dumps)")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def _png_folder(root: Path) -> torch.Tensor:
    from PIL import Image

    files = sorted((p for p in root.rglob("*") if p.suffix.lower() == ".png" and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if len(files) < 2:
        raise DataError(f"{root}: {len(files)} PNG files found (recursively); a sample set needs at least 2")
    arrays = []
    for file in files:
        try:
            with Image.open(file) as img:
                arr = np.asarray(img.convert("L" if img.mode in _GRAY else "RGB"), dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise DataError(f"{file}: unreadable image ({type(e).__name__}: {e})") from None
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(f"{file}: {list(arr.shape)} differs from {files[0]} ({list(arrays[0].shape)}); "
                            f"every image of a sample set must have one size and channel count")
        arrays.append(arr)
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def load_stats(path: str | Path) -> Statistics:
    """mu and sigma of a reference statistics file as float64, checked: [2048] and [2048, 2048], finite."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference statistics not found: {path} (an .npz with mu and sigma, e.g. EDM's "
                        f"cifar10-32x32.npz)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            mu, sigma = (f[k] if k in keys else None for k in ("mu", "sigma"))
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    if mu is None or sigma is None:
        raise DataError(f"{path} holds {', '.join(keys) or 'no arrays'}; reference statistics need mu and sigma")
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise DataError(f"{path}: mu {list(mu.shape)}, sigma {list(sigma.shape)}; Inception pool3 statistics are "
                        f"[{FEATURES}] and [{FEATURES}, {FEATURES}]")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)
            and np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{path}: mu and sigma must be finite floating-point arrays")
    return Statistics(path, sha256_file(path), {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)})


def _as_float64(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in stats.items()}  # torch-fidelity asserts equal dtypes


def score_external(samples: SampleSet, reference: Statistics, weights: inception.InceptionWeights,
                   device: torch.device, batch_size: int, folder: str | Path) -> dict:
    """The metrics record: FID of the sample set against the given statistics, from both libraries' pipelines
    and formulas.  Features are cached in `folder` (the caller removes it once the record is written)."""
    u8 = samples.images
    scorer = Scorer(weights, device, batch_size)
    feats = scorer.features(Images.of_uint8(u8), Path(folder), "Inception features, external samples")
    metrics = {f"fid_{lib}": libraries.frechet(lib, _as_float64(libraries.statistics(lib, f)), reference.stats)
               for lib, f in feats.items()}
    protocol = {
        "inception_label": weights.label, "inception_weights_file": weights.source,
        "inception_weights_sha256": weights.sha256, "inception_n": len(u8), "inception_libraries": library_versions(),
        "inception_reference": f"user-given statistics {reference.path} (sha256 {reference.sha256[:16]}...), mu "
                               f"and sigma used as is; their features come from whatever pipeline made the file",
        "inception_baseline": "none (no real images given)",
    }
    return {"samples": str(samples.path), "samples_format": samples.format,
            "images_sha256": hashlib.sha256(u8.contiguous().numpy().tobytes()).hexdigest(), "n_samples": len(u8),
            "image_shape": list(u8.shape[1:]), "reference_stats": str(reference.path),
            "reference_stats_sha256": reference.sha256, "metrics": metrics, "protocol": protocol}

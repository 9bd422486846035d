"""The two FID libraries' own code paths, for any feature network: features, statistics, Frechet distance.

torch-fidelity takes uint8 tensors through its Dataset pipeline (`get_featuresdict_from_dataset`) and computes
the distance with its eigenvalue formula; clean-fid reads image files through its `ResizeDataset` (mode
'clean': PIL bicubic on float pixels, unless `resize` replaces it) and uses its `sqrtm` formula.  Keeping the
two side by side in one module is what lets a row carry both numbers computed on the same images.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

LIBRARIES = ("torch_fidelity", "clean_fid")


class U8Images(torch.utils.data.Dataset):
    """uint8 [3, H, W] items, torch-fidelity's input (grayscale replicated to 3 channels); batches in one call."""

    def __init__(self, u8: torch.Tensor):
        self.x = (u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8).contiguous()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(self.x[torch.as_tensor(indices)].unbind(0))


def torch_fidelity_features(u8: torch.Tensor, extractor, batch_size: int, device: torch.device) -> np.ndarray:
    """Features of `extractor` (a torch-fidelity FeatureExtractorBase) for its FID layer."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    layer = extractor.get_default_feature_layer_for_metric("fid")
    feats = get_featuresdict_from_dataset(U8Images(u8), extractor, batch_size, device.type == "cuda",
                                          save_cpu_ram=True, verbose=False)
    return feats[layer].numpy()


def write_pngs(u8: torch.Tensor, folder: Path) -> list[str]:
    """Lossless image files, the input clean-fid reads (its folder API is built on them)."""
    from PIL import Image

    arr = u8.permute(0, 2, 3, 1).cpu().numpy()
    paths = []
    for i, img in enumerate(arr):
        path = folder / f"{i:07d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        paths.append(str(path))
    return paths


def clean_fid_features(u8: torch.Tensor, feature_fn, batch_size: int, device: torch.device,
                       resize=None) -> np.ndarray:
    """clean-fid's `get_files_features` in mode 'clean' with `feature_fn` as its custom feature extractor.

    `resize=None` keeps clean-fid's own 'clean' resize to 299x299; pass a function to replace it (a small
    network that reads images at their own size).
    """
    from cleanfid import fid

    workers = 0 if device.type == "cpu" else min(8, len(os.sched_getaffinity(0)))  # the job's cores, not the node's
    with tempfile.TemporaryDirectory(prefix="cmbench-cleanfid-") as tmp:
        files = write_pngs(u8, Path(tmp))
        return fid.get_files_features(files, model=feature_fn, num_workers=workers, batch_size=batch_size,
                                      device=device, mode="clean", custom_fn_resize=resize, verbose=False)


def statistics(library: str, features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and covariance as each library computes them."""
    if library == "torch_fidelity":
        from torch_fidelity.metric_fid import fid_features_to_statistics

        return fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))
    if library == "clean_fid":
        return {"mu": np.mean(features, axis=0), "sigma": np.cov(features, rowvar=False)}  # as fid_from_feats
    raise ValueError(f"unknown FID library {library!r} (known: {', '.join(LIBRARIES)})")


def frechet(library: str, a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The library's own Frechet distance between two statistics dicts."""
    if library == "torch_fidelity":
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])
    if library == "clean_fid":
        from cleanfid import fid

        with warnings.catch_warnings():  # SciPy 1.17 deprecates sqrtm's `disp`, which clean-fid passes
            warnings.simplefilter("ignore", DeprecationWarning)
            return float(fid.frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]))
    raise ValueError(f"unknown FID library {library!r} (known: {', '.join(LIBRARIES)})")

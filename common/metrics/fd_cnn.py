"""FD-CNN(dataset): a Frechet distance on the features of a small classifier the harness trains itself.

Inception weights cannot be fetched offline, so the offline image metric is a Frechet distance in
the 128-d penultimate features of a conv32-conv64-fc128 classifier trained on the dataset's training split
with a fixed seed and recipe.  It is computed by torch-fidelity through its feature-extractor API (so FD and
KID come from the library's own code), and is always named FD-CNN(dataset), never FID.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint
from ..config import FDCNNSpec, to_dict
from ..data import Dataset, data_hash, to_uint8_images
from .libraries import U8Images

RECIPE_VERSION = 1  # bump when the classifier or its training recipe changes: cached weights are keyed on it
EXTRACTOR_NAME = "cmbench-fd-cnn"


class FeatureCNN(torch.nn.Module):
    """conv32-conv64-fc128 classifier; `features` is the 128-d penultimate layer."""

    def __init__(self, in_channels: int, resolution: int, num_classes: int):
        super().__init__()
        self.pool = resolution >= 16  # 28x28 and up: pool twice; 8x8 keeps its resolution
        self.conv1 = torch.nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        side = resolution // 4 if self.pool else resolution
        self.fc = torch.nn.Linear(64 * side * side, 128)
        self.head = torch.nn.Linear(128, num_classes)
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(h, 2) if self.pool else h
        h = F.relu(self.conv2(h))
        h = F.max_pool2d(h, 2) if self.pool else h
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(ds: Dataset, spec: FDCNNSpec, device: torch.device, log=print) -> tuple[FeatureCNN, float]:
    """Deterministic training on the whole split; returns the net and its final-epoch training accuracy."""
    if ds.labels is None or ds.num_classes < 2:
        raise ValueError("FD-CNN needs a labeled dataset (its features come from a classifier)")
    g = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    c, h, _ = ds.item_shape
    net = FeatureCNN(c, h, ds.num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    acc = 0.0
    for epoch in range(spec.epochs):
        perm = torch.randperm(len(ds), generator=g)
        correct = 0
        for start in range(0, len(ds), spec.batch_size):
            idx = perm[start:start + spec.batch_size]  # only the batch is read and moved: the split may be mmapped
            x, y = ds.rows(idx).to(device), ds.labels[idx].to(device)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y).sum())
        acc = correct / len(ds)
        log(f"FD-CNN classifier epoch {epoch + 1}/{spec.epochs}: train accuracy {acc:.4f}")
    return net.eval().requires_grad_(False), acc


def classifier_path(ds: Dataset, spec: FDCNNSpec, cache_dir: str | Path) -> Path:
    """Cached weights keyed on (data content, recipe, recipe version): a change in any retrains."""
    return Path(cache_dir) / f"fdcnn-{hashlib.sha256(_key(ds, spec).encode()).hexdigest()[:16]}.pt"


def _key(ds: Dataset, spec: FDCNNSpec) -> str:
    return json.dumps({"data": data_hash(ds), "spec": to_dict(spec), "version": RECIPE_VERSION}, sort_keys=True)


def save_classifier(ds: Dataset, spec: FDCNNSpec, path: str | Path, device: torch.device, log=print) -> float:
    """Train and write the classifier with the key of what it was trained on; return its training accuracy."""
    net, acc = train_classifier(ds, spec, device, log)
    checkpoint.save(path, {"state": net.state_dict(), "in_channels": net.in_channels, "resolution": net.resolution,
                           "num_classes": net.num_classes, "train_accuracy": acc, "key": _key(ds, spec)})
    return acc


def check_classifier(path: str | Path, ds: Dataset, spec: FDCNNSpec) -> None:
    """A feature network trained on other data or with another recipe would make FD-CNN incomparable."""
    from core.errors import DataError

    state = checkpoint.load(path)
    if state.get("key") != _key(ds, spec):
        raise DataError(f"FD-CNN classifier {path} was trained on other data or with another recipe; "
                        f"rebuild it with `cmbench features`")


def load_or_train(ds: Dataset, spec: FDCNNSpec, cache_dir: str | Path, device: torch.device, log=print) -> Path:
    path = classifier_path(ds, spec, cache_dir)
    if not path.exists():
        save_classifier(ds, spec, path, device, log)
    return path


def load_classifier(path: str | Path, device="cpu") -> FeatureCNN:
    state = checkpoint.load(path, map_location=device)
    net = FeatureCNN(state["in_channels"], state["resolution"], state["num_classes"])
    net.load_state_dict(state["state"])
    return net.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# torch-fidelity plumbing


def _extractor_class():
    from torch_fidelity import FeatureExtractorBase

    class FDCNNExtractor(FeatureExtractorBase):
        """torch-fidelity feature extractor: uint8 [N, 3, H, W] -> our classifier's 128-d features."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = load_classifier(kwargs["feature_extractor_weights_path"])

        @staticmethod
        def get_provided_features_list():
            return ("128",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "128"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            x = x[:, : self.net.in_channels].float() / 127.5 - 1.0  # grayscale was replicated to 3 channels
            return (self.net.features(x),)

    return FDCNNExtractor


def _register() -> None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, _extractor_class())


def _U8Images(x: torch.Tensor) -> U8Images:
    """Images in [-1, 1] as the uint8 dataset torch-fidelity reads (contiguous, one indexing call per batch)."""
    return U8Images(to_uint8_images(x))


def fd_cnn(samples: torch.Tensor, reference: torch.Tensor, weights_path: str | Path, device: torch.device,
           kid: bool = True) -> dict[str, float]:
    """FD-CNN (and KID on the same features) of samples vs reference, both in [-1, 1], via torch-fidelity."""
    import torch_fidelity

    _register()
    n = min(len(samples), len(reference))
    out = torch_fidelity.calculate_metrics(
        input1=_U8Images(samples), input2=_U8Images(reference), fid=True, kid=kid,
        kid_subset_size=min(1000, n), feature_extractor=EXTRACTOR_NAME,
        feature_extractor_weights_path=str(weights_path), cuda=device.type == "cuda", verbose=False,
        save_cpu_ram=True, cache=False, batch_size=500)
    result = {"fd_cnn": float(out["frechet_inception_distance"])}
    if kid:
        result["kid_cnn"] = float(out["kernel_inception_distance_mean"])
    return result


# ---------------------------------------------------------------------------------------------------
# clean-fid plumbing: the same features through clean-fid's `custom_feat_extractor`


def clean_fid_extractor(net: FeatureCNN):
    """(feature_fn, resize_fn) for clean-fid: float [N, 3, H, W] in [0, 255] -> 128-d; images keep their size."""
    import numpy as np

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net.features(x[:, : net.in_channels] / 127.5 - 1.0)

    def keep_size(img: np.ndarray) -> np.ndarray:  # clean-fid accepts only uint8 or float32 here
        return img.astype(np.float32)

    return features, keep_size


def fd_cnn_clean_fid(samples: torch.Tensor, reference: torch.Tensor, weights_path: str | Path,
                     device: torch.device) -> float:
    """FD-CNN of samples vs reference (both in [-1, 1]) computed by clean-fid instead of torch-fidelity."""
    from . import libraries

    features, keep_size = clean_fid_extractor(load_classifier(weights_path, device))
    stats = [libraries.statistics("clean_fid", libraries.clean_fid_features(
        to_uint8_images(x), features, 500, device, resize=keep_size)) for x in (samples, reference)]
    return libraries.frechet("clean_fid", *stats)

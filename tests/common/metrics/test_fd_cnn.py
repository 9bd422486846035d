"""FD-CNN: the torch-fidelity path computes the Frechet distance of our classifier's features, and it ranks
corruptions as a distance should."""

import numpy as np
import pytest
import scipy.linalg
import torch

from common.config import FDCNNSpec
from common.data import Dataset, to_uint8_images
from common.metrics.fd_cnn import check_classifier, fd_cnn, load_classifier, save_classifier
from core.errors import DataError


@pytest.fixture(scope="module")
def digits_and_net(tmp_path_factory):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16 * 2 - 1
    ds = Dataset(x=x, labels=torch.from_numpy(d.target).long(), num_classes=10, kind="digits")
    path = tmp_path_factory.mktemp("fd") / "fdcnn.pt"
    acc = save_classifier(ds, FDCNNSpec(epochs=8), path, torch.device("cpu"), log=lambda m: None)
    return ds, path, acc


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_classifier_learns_digits(digits_and_net):
    _, _, acc = digits_and_net
    assert acc > 0.9


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU units: singular covariance
def test_torch_fidelity_path_equals_direct_frechet(digits_and_net):
    ds, path, _ = digits_and_net
    a, b = ds.x[:800], ds.x[800:1600]
    got = fd_cnn(a, b, path, torch.device("cpu"), kid=False)["fd_cnn"]
    net = load_classifier(path)
    feats = [net.features(to_uint8_images(x).float() / 127.5 - 1).double().numpy() for x in (a, b)]
    assert got == pytest.approx(frechet(*feats), rel=1e-4, abs=1e-3)


def test_distance_grows_with_corruption(digits_and_net):
    ds, path, _ = digits_and_net
    g = torch.Generator().manual_seed(0)
    ref = ds.x[:900]
    clean = fd_cnn(ds.x[900:1800], ref, path, torch.device("cpu"), kid=False)["fd_cnn"]
    noisy = [fd_cnn((ds.x[900:1800] + s * torch.randn(ds.x[900:1800].shape, generator=g)).clamp(-1, 1), ref, path,
                    torch.device("cpu"), kid=False)["fd_cnn"] for s in (0.3, 0.8)]
    assert clean < noisy[0] < noisy[1]


def test_classifier_trained_on_other_data_is_refused(digits_and_net):
    ds, path, _ = digits_and_net
    other = Dataset(x=ds.x.flip(-1), labels=ds.labels, num_classes=10, kind="digits")
    with pytest.raises(DataError, match="trained on other data"):
        check_classifier(path, other, FDCNNSpec(epochs=8))
    check_classifier(path, ds, FDCNNSpec(epochs=8))


@pytest.mark.parametrize("n_data,n_reference,n", [(1797, 1000, 500), (1797, None, 2000), (1797, 1500, 500)])
def test_real_vs_real_sets_are_disjoint_and_sized_as_described(n_data, n_reference, n):
    from common.evaluate import fd_cnn_real_sets

    reference, baseline, note = fd_cnn_real_sets(n_data, n_reference, n)
    assert len(reference) == (n_reference or n_data) and len(set(reference.tolist())) == len(reference)
    if len(baseline):
        assert len(baseline) == n and not set(baseline.tolist()) & set(reference.tolist())
        assert note.startswith(f"{n} real images disjoint")
    else:  # too few images beyond the reference: the note says the floor is two halves at a smaller N
        assert (n_reference or n_data) + n > n_data and "two disjoint halves" in note


def test_real_vs_real_floor_is_below_every_corrupted_score(digits_and_net):
    """The floor is the score of real images in the sample's place: what a perfect model would get."""
    from common.evaluate import fd_cnn_real_sets

    ds, path, _ = digits_and_net
    reference, baseline, _ = fd_cnn_real_sets(len(ds.x), 900, 800)
    ref = ds.x[reference]
    floor = fd_cnn(ds.x[baseline], ref, path, torch.device("cpu"), kid=False)["fd_cnn"]
    g = torch.Generator().manual_seed(1)
    noisy = fd_cnn((ds.x[baseline] + 0.3 * torch.randn(ds.x[baseline].shape, generator=g)).clamp(-1, 1), ref, path,
                   torch.device("cpu"), kid=False)["fd_cnn"]
    assert 0 < floor < noisy

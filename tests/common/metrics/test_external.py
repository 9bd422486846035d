"""External sample sets (EDM/ADM npz dumps, PNG folders) against given mu/sigma statistics (EDM's
cifar10-32x32.npz, ADM's VIRTUAL_imagenet64_labeled.npz): the FID of a set against its own statistics is zero in
both libraries whichever way the set is stored, and malformed files are one-line errors before any network runs.

The images are 299x299, the size both pipelines feed the network without resizing, so one statistics file
(torch-fidelity's, written by the harness) serves both libraries' pipelines.
"""

import json

import numpy as np
import pytest
import torch

from common.cli import main
from common.metrics import external, inception_fid, libraries

CPU = torch.device("cpu")
N = 8


@pytest.fixture(scope="module")
def own_stats(weights, tmp_path_factory):
    """N images as an EDM-style npz and as a PNG folder (nested, as EDM's generate.py writes), and the
    statistics of their Inception features written by the harness as a file with only mu and sigma."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("external")
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (N, 299, 299, 3), dtype=np.uint8)
    np.savez(folder / "samples.npz", arr_0=nhwc)
    for i, img in enumerate(nhwc):
        sub = folder / "pngs" / f"{i // 4:06d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:06d}.png")
    scorer = inception_fid.Scorer(weights, CPU, batch_size=N)
    u8 = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()
    feats = scorer.features(inception_fid.Images.of_uint8(u8), folder / "features", "test")
    stats = libraries.statistics("torch_fidelity", feats["torch_fidelity"])
    np.savez(folder / "stats.npz", mu=stats["mu"].astype(np.float64), sigma=stats["sigma"])
    return folder, float(np.trace(stats["sigma"]))


@pytest.mark.slow
@pytest.mark.parametrize("stored", ["samples.npz", "pngs"])
def test_a_set_scored_against_its_own_statistics_has_fid_zero(own_stats, weights, stored, no_downloads):
    folder, scale = own_stats
    out = folder / f"metrics-{stored}.json"
    cache = weights.state_dict_path.parent.parent  # the converted default_1 weights are reused, not rebuilt
    assert main(["evaluate", "--samples-external", str(folder / stored), "--reference-stats",
                 str(folder / "stats.npz"), "--inception-weights", "default_1", "--cache", str(cache),
                 "--batch-size", str(N), "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    print(stored, result["metrics"], f"tr(sigma) {scale:.4g}")  # shown with pytest -rP
    for lib in libraries.LIBRARIES:
        assert abs(result["metrics"][f"fid_{lib}"]) < 1e-3  # measured -1.08e-5 in both (tr(sigma) 14.4)
    assert result["n_samples"] == N and result["image_shape"] == [3, 299, 299]
    assert "used as is" in result["protocol"]["inception_reference"]
    assert result["protocol"]["inception_label"] == "Inception FID (default_1 weights)"
    assert not (folder / f"metrics-{stored}.json.features").exists()


def test_npz_and_png_folder_read_the_same_images(tmp_path):
    from PIL import Image

    nhwc = np.random.default_rng(1).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=nhwc)
    (tmp_path / "pngs").mkdir()
    for i, img in enumerate(nhwc):
        Image.fromarray(img).save(tmp_path / "pngs" / f"{i}.png")
    a, b = external.load_images(tmp_path / "a.npz"), external.load_images(tmp_path / "pngs")
    assert a.images.shape == (3, 3, 5, 7) and a.images.dtype == torch.uint8 and torch.equal(a.images, b.images)
    assert a.format.startswith("npz arr_0") and b.format == "folder of PNG files"


def _garbage(path):
    path.write_bytes(b"not an npz")
    return path


def _stats_file(tmp_path, **arrays):
    path = tmp_path / "stats.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make, words", [
    (lambda p: _stats_file(p, mu=np.zeros(2048)), "need mu and sigma"),
    (lambda p: _stats_file(p, mu=np.zeros(64), sigma=np.eye(64)), "mu [64], sigma [64, 64]"),
    (lambda p: _stats_file(p, mu=np.full(2048, np.nan), sigma=np.eye(2048)), "must be finite"),
    (lambda p: _garbage(p / "stats.npz"), "not a readable .npz"),
    (lambda p: p / "missing.npz", "reference statistics not found"),
])
def test_malformed_statistics_are_one_line_errors(tmp_path, capsys, make, words):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    code = main(["evaluate", "--samples-external", str(tmp_path / "s.npz"), "--reference-stats",
                 str(make(tmp_path)), "--inception-weights", str(tmp_path / "never-read.pth"),
                 "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("arrays, words", [
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "expected uint8 [N >= 2, H, W, 1 or 3]"),
    ({"arr_0": np.zeros((4, 8, 8, 4), np.uint8)}, "expected uint8"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "needs arr_0"),
])
def test_malformed_sample_sets_are_one_line_errors(tmp_path, capsys, arrays, words):
    np.savez(tmp_path / "s.npz", **arrays)
    stats = _stats_file(tmp_path, mu=np.zeros(2048), sigma=np.eye(2048))
    code = main(["evaluate", "--samples-external", str(tmp_path / "s.npz"), "--reference-stats", str(stats),
                 "--inception-weights", "default_1", "--cache", str(tmp_path), "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err

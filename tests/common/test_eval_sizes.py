"""Evaluation sizes are checked against the known sizes of the data before any job runs: every shipped config
(the paper tracks' 50,000-sample Inception FID included) fits, and a reference N the data cannot hold is a
one-line ConfigError naming the key."""

from pathlib import Path

import pytest
import yaml

from common.cli import main
from common.config import config_from_data, load_config
from common.eval_sizes import check_config, split_size
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


def _variants():
    """(file, budget) for every config file and each of its budgets."""
    for path in CONFIGS:
        yield path, None
        for name in (yaml.safe_load(path.read_text()) or {}).get("budgets", {}):
            yield path, name


@pytest.mark.parametrize("path, budget", list(_variants()), ids=lambda v: getattr(v, "name", v))
def test_every_shipped_config_fits_its_data(path, budget):
    data = yaml.safe_load(path.read_text())
    if budget is not None:
        data["budget"] = budget
    check_config(config_from_data(data, str(path)), str(path))


def test_the_paper_tracks_score_50k_samples_against_the_whole_training_split():
    cifar = load_config(ROOT / "config/cifar10.yaml").datasets["cifar10"]
    assert cifar.inception.enabled and cifar.inception.n == 50_000 and cifar.eval.n_samples >= 50_000
    assert split_size(cifar.data, "train") == 50_000 and split_size(cifar.data, "test") == 10_000
    imagenet = load_config(ROOT / "config/imagenet64.yaml").datasets["imagenet64"]
    assert imagenet.inception.n == 50_000 and split_size(imagenet.data, "train") is None  # checked when read


BASE = {
    "datasets": {"cifar10": {"data": {"kind": "cifar10"}, "eval": {"n_samples": 50000},
                             "inception": {"enabled": True, "n": 50000}}},
    "methods": {"teacher": {}, "ect": {}},
}


def _with(path: str, value):
    """BASE with the dotted key `path` set (a fresh copy)."""
    import copy

    data = copy.deepcopy(BASE)
    *keys, last = path.split(".")
    node = data
    for k in keys:
        node = node.setdefault(k, {})
    node[last] = value
    return data


@pytest.mark.parametrize("key, value, words", [
    ("datasets.cifar10.inception.n_reference", 60000, "datasets.cifar10.inception.n_reference = 60000"),
    ("datasets.cifar10.inception.n_baseline", 20000, "inception.n_baseline = 20000 but the cifar10 test split has"),
    ("datasets.cifar10.inception.baseline", "disjoint", "datasets.cifar10.inception.n_baseline: the disjoint"),
    ("datasets.cifar10.eval.n_reference", 70000, "datasets.cifar10.eval.n_reference = 70000"),
    ("datasets.cifar10.data.max_items", 1000, "n_reference"),  # the whole split is then 1,000 images...
    ("methods.ect.eval", {"n_samples": 10000}, "method ect draws eval.n_samples = 10000"),
])
def test_sizes_beyond_the_data_fail_before_any_job(key, value, words):
    data = _with(key, value)
    if key.endswith("max_items"):  # ... and a reference of 2,000 does not fit
        data["datasets"]["cifar10"]["inception"]["n_reference"] = 2000
    with pytest.raises(ConfigError) as e:
        check_config(config_from_data(data, "bad.yaml"), "bad.yaml")
    assert words in str(e.value) and str(e.value).startswith("bad.yaml: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("entry, words", [
    ({"data": {"kind": "digits"}, "inception": {"enabled": True, "n": 1796}, "eval": {"n_samples": 2000}},
     "inception.n_baseline: the disjoint baseline needs 1796 digits training images"),
    ({"data": {"kind": "digits"}, "inception": {"enabled": True, "n": 100, "baseline": "test_split"}},
     "inception.baseline: digits data have no test split"),
    ({"data": {"kind": "image_folder", "path": "x"}, "inception": {"enabled": True, "baseline": "test_split"}},
     "image_folder data have no test split"),
    ({"data": {"kind": "gmm", "gmm": {"means": [[0.0]], "stds": [1.0], "weights": [1.0]}},
      "inception": {"enabled": True}}, "Inception FID is for images"),
])
def test_kinds_without_a_test_split_or_without_images(entry, words):
    config = config_from_data({"datasets": {"d": entry}}, "bad.yaml")
    with pytest.raises(ConfigError, match=words):
        check_config(config, "bad.yaml")


def test_an_image_folder_passes_here_and_is_checked_when_read():
    config = config_from_data({"datasets": {"d": {"data": {"kind": "image_folder", "path": "x"}, "inception": {
        "enabled": True, "n": 10**6, "n_reference": 10**7}, "eval": {"n_samples": 10**6}}}}, "ok.yaml")
    check_config(config, "ok.yaml")


def test_inception_ref_refuses_before_reading_any_data(tmp_path, capsys):
    """No CIFAR-10 archive here: the size error comes first, naming the key."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_with("datasets.cifar10.inception.n_reference", 60000)))
    code = main(["inception-ref", "--config", str(cfg), "--dataset", "cifar10", "--out", str(tmp_path / "r.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "inception.n_reference = 60000" in err and len(err.splitlines()) == 1, err

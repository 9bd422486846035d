"""Every bad input of docs/cluster.md ("Bad input"): one line on stderr, a nonzero exit status, no
traceback, and (except where the input is only known after reading data) before any training step."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from common.cli import main
from common.config import load_config, resolve_run, to_dict
from tests.reliability.conftest import CONFIG, ROOT, env

BASE = yaml.safe_load(CONFIG)


def _config(tmp_path, change=None) -> str:
    data = copy.deepcopy(BASE)
    if change:
        change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _set(dotted: str, value):
    def change(data):
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return change


def _train(tmp_path, change=None, dataset="pts", method="teacher", extra=()):
    return ["train", "--config", _config(tmp_path, change), "--dataset", dataset, "--method", method,
            "--out", str(tmp_path / "run"), *extra]


def _samples(tmp_path, samples: np.ndarray, *, meta: dict | None = None) -> str:
    """A samples file as `cmbench sample` writes it, holding the given array."""
    run = resolve_run(load_config(_config(tmp_path)), "pts", "teacher", 0)
    meta = meta if meta is not None else {"run": to_dict(run), "run_dir": "R", "steps": 1, "nfe": 1, "sample_seed": 0,
                                          "weights": "ema", "start_sigma": 80.0}
    path = tmp_path / "s.npz"
    np.savez(path, samples=samples.astype(np.float32), meta=np.array(json.dumps(meta)))
    return str(path)


def _evaluate(tmp_path, samples: np.ndarray, meta=None, out=None):
    return ["evaluate", "--samples", _samples(tmp_path, samples, meta=meta), "--out", out or str(tmp_path / "m.json")]


def _file(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _cifar(path):
    return lambda d: d["datasets"]["pts"].update(
        data={"kind": "cifar10", "path": path}, network={"kind": "unet", "model_channels": 8, "channel_mult": [1]})


def _image_dataset(d):  # an image dataset whose data are never read: the checks come first
    d["datasets"]["pts"].update(data={"kind": "cifar10", "path": "never-read.tar.gz"},
                                network={"kind": "unet", "model_channels": 8, "channel_mult": [1]})


POINTS = np.random.default_rng(0).normal(size=(64, 2))

# (case, argv builder, words the one line must hold).
CASES = [
    ("unknown method", lambda p: _train(p, method="nope"), ["unknown method 'nope'", "available"]),
    ("unknown dataset", lambda p: _train(p, dataset="cifar"), ["unknown dataset 'cifar' (defined: pts)"]),
    ("unknown backbone", lambda p: _train(p, _set("datasets.pts.network.kind", "transformer")),
     ["datasets.pts.network.kind: 'transformer' is not one of ['unet', 'mlp']"]),
    ("unknown key", lambda p: _train(p, _set("datasets.pts.train.lrr", 0.1)),
     ["unknown key 'datasets.pts.train.lrr' (allowed here:"]),
    ("wrong type", lambda p: _train(p, _set("datasets.pts.train.lr", "fast")),
     ["datasets.pts.train.lr: expected a number, got 'fast'"]),
    ("wrong type (integer)", lambda p: _train(p, _set("datasets.pts.train.batch_size", 1.5)),
     ["datasets.pts.train.batch_size: expected an integer, got 1.5"]),
    ("out of range", lambda p: _train(p, _set("datasets.pts.train.batch_size", 0)),
     ["datasets.pts.train.batch_size: must be >= 1"]),
    ("out of range (probability)", lambda p: _train(p, _set("datasets.pts.network.dropout", 1.5)),
     ["datasets.pts.network.dropout: must be in [0, 1)"]),
    ("distillation without a teacher", lambda p: _train(p, _image_dataset, method="cd"),
     ["method 'cd' distills a teacher: pass --teacher RUN_DIR"]),
    ("backbone feature contradicting the method", lambda p: _train(p, _set("datasets.pts.network.second_time_input",
                                                                            False), method="ctm"),
     ["network.second_time_input: false contradicts method 'ctm', which needs it; remove the key"]),
    ("backbone feature the method does not use", lambda p: _train(p, _set("datasets.pts.network.logvar_head", True)),
     ["network.logvar_head: true contradicts method 'teacher', which does not use it"]),
    ("training steps < 1", lambda p: _train(p, _set("datasets.pts.train.iterations", 0)),
     ["datasets.pts.train.iterations: must be >= 1"]),
    ("sampling steps < 1 (config)", lambda p: _train(p, _set("datasets.pts.eval.steps", [2, 0])),
     ["datasets.pts.eval.steps: needs at least one value >= 1"]),
    ("sampling steps < 1 (CLI)", lambda p: ["sample", "--run", "R", "--steps", "0", "--n", "5", "--out", "x.npz"],
     ["--steps must be >= 1, got 0"]),
    ("empty NFE list", lambda p: _train(p, _set("datasets.pts.eval.steps", [])),
     ["datasets.pts.eval.steps: needs at least one value >= 1"]),
    ("missing config file", lambda p: ["train", "--config", str(p / "nope.yaml"), "--dataset", "pts", "--method",
                                       "teacher", "--out", str(p / "run")], ["config file not found"]),
    ("config not YAML", lambda p: ["train", "--config", _file(p, "c.yaml", b"a: [1, 2"), "--dataset", "pts",
                                   "--method", "teacher", "--out", str(p / "run")], ["not valid YAML"]),
    ("missing data archive", lambda p: _train(p, _cifar(str(p / "cifar-10-python.tar.gz"))),
     ["CIFAR-10 not found at", "cannot download it"]),
    ("wrong-format data archive", lambda p: _train(p, _cifar(_file(p, "cifar-10-python.tar.gz", b"not a tar" * 50))),
     ["unreadable CIFAR-10 archive"]),
    ("missing prepared data", lambda p: _train(p, extra=["--data", str(p / "nope.pt")]),
     ["prepared data not found at", "cmbench prepare"]),
    ("wrong-format prepared data", lambda p: _train(p, extra=["--data", _file(p, "d.pt", b"\x00" * 100)]),
     ["prepared data at", "is unreadable"]),
    ("output folder not writable (train)", lambda p: [*_train(p)[:-2], "--out", _file(p, "f", b"") + "/run"],
     ["output folder", "is not writable", "choose another --out"]),
    ("output folder not writable (evaluate)", lambda p: _evaluate(p, POINTS, out=_file(p, "f", b"") + "/m.json"),
     ["cannot write", "choose another output folder"]),
    ("samples with NaN", lambda p: _evaluate(p, np.where(np.arange(128).reshape(64, 2) == 7, np.nan, POINTS)),
     ["1 of 64 samples contain NaN or inf"]),
    ("samples of the wrong shape", lambda p: _evaluate(p, np.zeros((64, 3))),
     ["samples have shape (64, 3) but pts points are [N, 2]"]),
    ("samples file without meta", lambda p: _evaluate(p, POINTS, meta={}), ["meta lacks run, steps"]),
    ("samples file not npz", lambda p: ["evaluate", "--samples", _file(p, "s.npz", b"junk"), "--out", "m.json"],
     ["is not a cmbench samples file"]),
    ("missing samples file", lambda p: ["evaluate", "--samples", "MISSING.npz", "--out", "m.json"],
     ["samples file not found"]),
]


# One bad parameter per method (every registered method has a row), the shared CM base's included.
METHOD_PARAMS = [
    ("teacher", "P_std", -1.0, "must be > 0"),
    ("cd", "N", 1, "must be >= 2"),
    ("cd", "mid_sigmas", [0.5, 0.9], "must descend inside (0.002, 80.0)"),
    ("ct", "mu0", 1.5, "must lie in (0, 1)"),
    ("ict", "s1", 5, "must be >= s0"),
    ("ect", "q", 0.5, "must be > 1"),
    ("ctm", "gamma", 2.0, "must lie in [0, 1]"),
    ("ctm", "K_max", 18, "must lie in [1, N - 1] = [1, 17]"),
    ("ctm", "gan", True, "the GAN term (StyleGAN-XL discriminator) is not implemented"),
    ("sct", "tangent_norm_c", 0.0, "must be > 0"),
    ("scd", "P_std", 0.0, "must be > 0"),
    ("facm", "p", -1.0, "must be > 0"),
]
CASES += [(f"{m}.{key}", lambda p, m=m, key=key, v=v: _train(p, _set(f"methods.{m}.params.{key}", v), method=m),
           [f"methods.{m}.params.{key}: {words}"]) for m, key, v, words in METHOD_PARAMS]


def test_every_method_has_a_bad_parameter_case():
    from methods.registry import available

    assert set(available()) <= {m for m, *_ in METHOD_PARAMS}


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_nonzero(case, argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(argv(tmp_path))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (case, code, err)
    assert len(err.splitlines()) == 1 and err.startswith("cmbench ") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run" / "checkpoints").exists()  # rejected before any training step
    print(f"{case}: {err}")


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    argv = _train(tmp_path, _set("datasets.pts.train.lrr", 0.1))
    proc = subprocess.run([sys.executable, "-m", "common.cli", *argv], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unknown key 'datasets.pts.train.lrr'" in proc.stderr


def test_fid_weights_missing_or_wrong_hash(tmp_path, monkeypatch):
    """The FID-weights rows of the table (common/metrics/inception.py, checked before either FID library runs)."""
    inception = pytest.importorskip("common.metrics.inception")
    from core.errors import CmbenchError

    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    cases = [(None, "no weights are given"), (str(tmp_path / "nope.pth"), "Inception weights file not found"),
             (_file(tmp_path, inception.OFFICIAL_NAME, b"not the weights"), "is not the official Inception file")]
    for setting, words in cases:
        with pytest.raises(CmbenchError, match=words) as info:
            inception.resolve_weights(setting, "eval.fid.weights", tmp_path / "cache")
        assert len(str(info.value).splitlines()) == 1

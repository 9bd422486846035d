"""The CLI: train -> sample -> evaluate on a tiny gmm run, and one-line errors with exit status 2."""

import json

import numpy as np
import pytest

from common.cli import main

CONFIG = """
datasets:
  pts:
    data:
      kind: gmm
      n_train: 256
      gmm: {means: [[0.5, 0.0], [-0.5, 0.0]], stds: [0.1, 0.1], weights: [0.5, 0.5]}
    network: {kind: mlp, hidden: 16, depth: 1}
    train: {iterations: 20, batch_size: 32, log_every: 10, checkpoint_every: 10, device: cpu}
    eval: {n_samples: 64, steps: [1]}
"""


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(CONFIG)
    return str(p)


def test_train_sample_evaluate(cfg, tmp_path, capsys):
    run, samples, metrics = tmp_path / "run", tmp_path / "s.npz", tmp_path / "m.json"
    assert main(["train", "--config", cfg, "--dataset", "pts", "--method", "teacher", "--out", str(run)]) == 0
    assert main(["sample", "--run", str(run), "--steps", "2", "--n", "50", "--seed", "3", "--out", str(samples)]) == 0
    with np.load(samples) as f:
        assert f["samples"].shape == (50, 2) and f["samples"].dtype == np.float32
        meta = json.loads(str(f["meta"]))
    assert meta["nfe"] == 3 and meta["sample_seed"] == 3
    assert main(["evaluate", "--samples", str(samples), "--out", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert result["nfe"] == 3 and {"nll", "energy_distance", "flow_map_error_mean"} <= set(result["metrics"])
    m = result["metrics"]
    assert {"mode_weight_tv", "mode_weight_tv_real", "off_mode_share", "off_mode_share_real"} <= set(m)
    assert m["nll_gap"] == m["nll"] - m["entropy"] and result["protocol"]["off_mode_quantile"] == 0.01
    assert not (tmp_path / "s.npz.parts").exists()  # the shards go once the samples file holds them


def test_a_killed_sampling_job_resumes_from_its_shards(cfg, tmp_path, monkeypatch):
    """Killed after some shards: the rerun draws only the rest and writes bitwise the samples of one pass."""
    import common.records
    import common.sample

    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--dataset", "pts", "--method", "teacher", "--out", str(run)]) == 0
    args = ["sample", "--run", str(run), "--steps", "2", "--n", "50", "--seed", "3", "--batch-size", "8",
            "--shard-size", "16", "--device", "cpu", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "once.npz")]) == 0

    def killed(*a, **k):
        raise KeyboardInterrupt  # the time limit, after every shard but before the samples file

    monkeypatch.setattr(common.records, "write_samples", killed)
    out = tmp_path / "s.npz"
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(out)])
    parts = tmp_path / "s.npz.parts"
    assert sorted(p.name for p in parts.iterdir()) == [f"shard-0000{i}.npz" for i in range(4)]  # 16+16+16+2
    (parts / "shard-00003.npz").unlink()
    monkeypatch.undo()
    drawn = []
    real = common.sample.generate
    monkeypatch.setattr(common.sample, "generate", lambda *a, **k: drawn.append(k["start"]) or real(*a, **k))
    assert main([*args, "--out", str(out)]) == 0
    assert drawn == [48] and not parts.exists()
    with np.load(out) as a, np.load(tmp_path / "once.npz") as b:
        for key in ("samples", "latents"):
            assert np.array_equal(a[key], b[key])


@pytest.mark.parametrize("args, words", [
    (["train", "--dataset", "pts", "--method", "nope", "--out", "R"], ["unknown method 'nope'", "available"]),
    (["train", "--dataset", "cifar", "--method", "teacher", "--out", "R"], ["unknown dataset 'cifar'"]),
    (["sample", "--run", "R", "--steps", "0", "--n", "5", "--out", "x.npz"], ["--steps must be >= 1"]),
    (["sample", "--run", "MISSING", "--steps", "1", "--n", "5", "--out", "x.npz"], ["run config not found"]),
    (["sample", "--run", "R", "--steps", "1", "--n", "5", "--out", "x.npz", "--shard-size", "0"], ["--shard-size"]),
    (["sample", "--run", "R", "--steps", "1", "--n", "5", "--out", "x.npz", "--threads", "0"], ["--threads"]),
    (["evaluate", "--samples-external", "x.npz", "--out", "m.json"], ["needs --reference-stats"]),
    (["evaluate", "--samples", "s.npz", "--reference-stats", "r.npz", "--out", "m.json"],
     ["--reference-stats goes with --samples-external"]),
    (["evaluate", "--samples", "MISSING.npz", "--out", "m.json"], ["samples file not found"]),
])
def test_bad_input_is_one_line_exit_2(cfg, tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    if args[0] == "train":
        args = [*args, "--config", cfg]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_nan_samples_are_refused(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, samples=np.full((4, 2), np.nan, np.float32), meta=np.array("{}"))
    assert main(["evaluate", "--samples", str(bad), "--out", str(tmp_path / "m.json")]) == 2
    assert "4 of 4 samples contain NaN" in capsys.readouterr().err

"""The files between stages: run-folder names, the stats reader, samples files, metrics kinds, workflow patterns."""

import json
import subprocess
import sys

import numpy as np
import pytest

from common.records import (
    FINAL_FILE,
    GRID_FILE,
    RUN_DIR,
    RunDir,
    grid_key,
    metrics_kind,
    read_samples,
    read_stats,
    truncate_stats,
    write_samples,
)
from core.errors import DataError


def test_run_dir_names_its_files(tmp_path):
    run = RunDir(tmp_path / "run")
    names = {k: getattr(run, k).name for k in ("config", "stats", "run_info", "failure", "final", "checkpoints")}
    assert names == {"config": "config.json", "stats": "stats.jsonl", "run_info": "run_info.json",
                     "failure": "failure.json", "final": "final.pt", "checkpoints": "checkpoints"}
    assert run.read_run_info() == {} and run.read_failure() is None and run.read_stats() == []
    assert FINAL_FILE == RUN_DIR + "/final.pt" == "results/runs/{dataset}/{method}/seed{seed}/final.pt"
    assert grid_key(GRID_FILE.format(dataset="gmm", method="ct", seed=3, steps=2)) == ("gmm", "ct", 3)


def test_read_stats_skips_a_torn_line_and_truncate_drops_later_steps(tmp_path):
    path = tmp_path / "stats.jsonl"
    path.write_text(json.dumps({"step": 10}) + "\n" + json.dumps({"step": 20}) + "\n" + '{"step": 3')
    assert [r["step"] for r in read_stats(path)] == [10, 20]
    truncate_stats(path, 10)
    assert path.read_text() == json.dumps({"step": 10}) + "\n"


def test_samples_round_trip_and_validation(tmp_path):
    meta = {"run": {}, "steps": 1, "nfe": 1, "sample_seed": 0, "weights": "ema"}
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    write_samples(tmp_path / "s.npz", x, -x, np.arange(4), meta)
    samples, latents, got = read_samples(tmp_path / "s.npz")
    assert np.array_equal(samples, x) and np.array_equal(latents, -x) and got == meta
    with np.load(tmp_path / "s.npz") as f:
        assert f.files == ["samples", "latents", "meta", "labels"]
    write_samples(tmp_path / "bad.npz", x, -x, None, {k: v for k, v in meta.items() if k != "nfe"})
    with pytest.raises(DataError, match="meta lacks nfe"):
        read_samples(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="samples file not found"):
        read_samples(tmp_path / "none.npz")


def test_metrics_kind_follows_the_metric_names():
    assert metrics_kind(["nll", "energy_distance", "flow_map_error_mean"]) == "gmm"
    assert metrics_kind(["fd_cnn", "fd_cnn_real", "kid_cnn"]) == "image"
    with pytest.raises(ValueError):
        metrics_kind(["accuracy"])


def test_records_does_not_import_torch():
    code = "import sys, common.records, common.report, common.tracking; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

"""The files that pass between stages: their names, their paths in the workflow, and their readers and writers.

A run folder (`RunDir`) holds config.json (the resolved run config), stats.jsonl (one JSON line per logging
interval), checkpoints/, run_info.json and final.pt once done, and failure.json when training stopped with an
error.  A samples file (.npz) holds `samples`, `latents`, `labels` (conditional runs) and a JSON `meta` with the
run's resolved config; a metrics file (.json) is what `cmbench evaluate` returns.  The workflow builds its paths
from the patterns below, so a name is typed once.  No torch here: `cmbench report` and `track` do without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import DataError

from . import fsutil

# File names inside a run folder
CONFIG = "config.json"
STATS = "stats.jsonl"
RUN_INFO = "run_info.json"
FAILURE = "failure.json"  # the last attempt's error (non-finite stop); tracking marks the MLflow run FAILED
FINAL = "final.pt"  # raw and EMA weights; its presence marks the run done
CHECKPOINTS = "checkpoints"

# Path patterns of the workflow (Snakemake wildcards in braces)
RUN_DIR = "results/runs/{dataset}/{method}/seed{seed}"
FINAL_FILE = f"{RUN_DIR}/{FINAL}"
SAMPLES_FILE = "results/samples/{dataset}/{method}/seed{seed}/steps{steps}.npz"
METRICS_FILE = "results/metrics/{dataset}/{method}/seed{seed}/steps{steps}.json"
GRID_FILE = "results/grids/{dataset}/{method}/seed{seed}/steps{steps}.png"
PREPARED_FILE = "data/prepared/{dataset}.pt"
FD_CNN_FILE = "data/features/{dataset}/fdcnn.pt"
INCEPTION_REF_FILE = "data/features/{dataset}/inception_ref.npz"
SUMMARY_DIR = "results/summary"  # `cmbench report` writes common.report.SUMMARY_NAMES here
TRACKING_RECORD = "results/tracking/mlflow.json"  # `cmbench track`'s record of the MLflow run ids


@dataclass
class RunDir:
    """A run folder and the paths of its files."""

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def stats(self) -> Path:
        return self.path / STATS

    @property
    def run_info(self) -> Path:
        return self.path / RUN_INFO

    @property
    def failure(self) -> Path:
        return self.path / FAILURE

    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def read_config(self) -> dict:
        """config.json as written (a dict; `common.config.load_run_config` turns it into a RunConfig)."""
        return json.loads(self.config.read_text())

    def read_stats(self) -> list[dict]:
        return read_stats(self.stats)

    def read_run_info(self) -> dict:
        """run_info.json, or {} before the run has finished."""
        return json.loads(self.run_info.read_text()) if self.run_info.exists() else {}

    def read_failure(self) -> dict | None:
        """failure.json, or None when the last attempt did not fail."""
        return json.loads(self.failure.read_text()) if self.failure.exists() else None


# stats.jsonl


def read_stats(path: str | Path) -> list[dict]:
    """The rows of a stats.jsonl ([] if there is none); a line torn by a kill in mid-append is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_stats(path: str | Path, row: dict) -> None:
    fsutil.append_line(path, json.dumps(row))


def truncate_stats(path: str | Path, step: int) -> None:
    """Drop stats lines past `step` (and torn ones), so a resumed run's history has no duplicates."""
    path = Path(path)
    if not path.exists():
        return
    rows = [row for row in read_stats(path) if row["step"] <= step]
    fsutil.atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def grid_key(path: str | Path) -> tuple[str, str, int]:
    """(dataset, method, seed) of a picture at GRID_FILE."""
    parts = Path(path).parts
    return parts[-4], parts[-3], int(parts[-2].removeprefix("seed"))


# Samples files

META_KEYS = ("run", "steps", "nfe", "sample_seed", "weights")  # what every samples file's meta holds


def write_samples(path: str | Path, samples, latents, labels, meta: dict) -> None:
    """Write a samples file atomically; `labels` is None for unconditional runs."""
    arrays = {"samples": np.asarray(samples), "latents": np.asarray(latents), "meta": np.array(json.dumps(meta))}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    fsutil.atomic_write(path, lambda f: np.savez(f, **arrays))


def read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(samples, latents or None, meta) of a samples file, checked: finite, [N >= 2, ...], meta complete."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples file not found: {path} (make it with `cmbench sample`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            samples = f["samples"]
            latents = f["latents"] if "latents" in f else None
            meta = json.loads(str(f["meta"]))
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"{path} is not a cmbench samples file (needs keys samples, meta): {e}") from None
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).reshape(len(samples), -1).any(1).sum())
        raise DataError(f"{path}: {bad} of {len(samples)} samples contain NaN or inf; the sampler or the run diverged")
    if samples.ndim < 2 or len(samples) < 2:
        raise DataError(f"{path}: samples have shape {samples.shape}; expected [N >= 2, ...] (points or images)")
    if latents is not None and latents.shape != samples.shape:
        raise DataError(f"{path}: latents have shape {latents.shape} but samples {samples.shape}; the file is damaged")
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{path}: meta lacks {', '.join(missing)}; write samples files with `cmbench sample`")
    return samples, latents, meta


# Metrics files

# The metric that every metrics file of a dataset kind holds (evaluate.py: exact metrics on gmm, FD-CNN on images)
KIND_METRIC = {"gmm": "energy_distance", "image": "fd_cnn"}


def read_metrics(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def metrics_kind(metric_names: Iterable[str]) -> str:
    """'gmm' or 'image': the dataset kind of a metrics record, from the names of its metrics."""
    names = set(metric_names)
    for kind, metric in KIND_METRIC.items():
        if metric in names:
            return kind
    raise ValueError(f"metrics {sorted(names)} hold neither {' nor '.join(KIND_METRIC.values())}: "
                     f"not a cmbench metrics record")

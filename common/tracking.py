"""MLflow ingestion: the one writer that turns run folders and metrics files into MLflow runs.

Jobs (local or SLURM) only write files; this step logs them, so many jobs never race on one sqlite file.  One
MLflow run per (dataset, method, seed) holds the resolved config as params, the training curves from
stats.jsonl as metric histories, each evaluation metric as a history over NFE (and flat as `<metric>_nfe<k>`),
sample grids and summary plots as artifacts, and tags for the git commit and the data hash.  Re-ingesting
unchanged files is a no-op; changed files replace the old MLflow run.  A run folder whose training stopped with an
error (failure.json, no final.pt) becomes a FAILED MLflow run with its curves so far and the error as a tag.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

from core.errors import ConfigError

from .records import RunDir, grid_key, read_metrics

KEY_TAG = "cmbench.key"
FINGERPRINT_TAG = "cmbench.fingerprint"


def default_tracking_uri(root: str | Path = ".") -> str:
    """Explicit always: config > MLFLOW_TRACKING_URI > sqlite under results/mlflow."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(root) / 'results' / 'mlflow' / 'mlflow.db').resolve()}"


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a local sqlite store go beside the database, not into ./mlruns of whatever the cwd is."""
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "artifacts")
    return None  # a tracking server decides


def git_commit(root: str | Path = ".") -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def _run_times(run_dir: RunDir) -> tuple[int, int]:
    """MLflow start and end times (ms) of the training itself, not of this ingestion."""
    start = run_dir.config.stat().st_mtime
    end = run_dir.final.stat().st_mtime if run_dir.final.exists() else start
    return int(start * 1000), int(end * 1000)


def ui_path(experiment_id: str) -> str:
    """The runs table of an experiment; MLflow 3 opens its GenAI view unless asked for this one."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _experiment(client, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, artifact_location=artifact_root)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    # open in MLflow's classic runs view, not its GenAI view (MLflow 3 UI reads this tag)
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    return exp_id


def ingest(run_dirs: list[str | Path], metrics_files: list[str | Path], grids: list[str | Path],
           summary_files: list[str | Path], tracking_uri: str, experiment: str, artifact_root: str | None = None,
           log=print) -> tuple[str, dict[str, str]]:
    """Log every run; return (experiment id, {key: mlflow run id})."""
    import mlflow
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    if not tracking_uri:
        raise ConfigError("no MLflow tracking URI: set workflow.mlflow.tracking_uri or MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = _experiment(client, experiment, artifact_root or default_artifact_root(tracking_uri))
    commit = git_commit()

    by_run: dict[tuple, list[dict]] = defaultdict(list)
    metric_paths: dict[tuple, list[Path]] = defaultdict(list)
    for path in map(Path, metrics_files):
        m = read_metrics(path)
        key = (m["dataset"], m["method"], int(m["seed"]))
        by_run[key].append(m)
        metric_paths[key].append(path)
    grid_paths: dict[tuple, list[Path]] = defaultdict(list)
    for path in map(Path, grids):
        grid_paths[grid_key(path)].append(path)

    ids = {}
    for run_dir in map(RunDir, run_dirs):
        config = run_dir.read_config()
        key = (config["dataset"], config["method"], int(config["seed"]))
        key_str = f"{key[0]}/{key[1]}/seed{key[2]}"
        failure = run_dir.read_failure()
        files = [run_dir.config, run_dir.stats, run_dir.run_info, run_dir.failure, *metric_paths[key],
                 *grid_paths[key]]
        fingerprint = _fingerprint([f for f in files if f.exists()])
        existing = client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key_str}'")
        if any(r.data.tags.get(FINGERPRINT_TAG) == fingerprint for r in existing):
            ids[key_str] = next(r.info.run_id for r in existing if r.data.tags.get(FINGERPRINT_TAG) == fingerprint)
            log(f"{key_str}: unchanged, already in MLflow ({ids[key_str]})")
            continue
        for r in existing:
            client.delete_run(r.info.run_id)
        info = run_dir.read_run_info()
        tags = {KEY_TAG: key_str, FINGERPRINT_TAG: fingerprint, "mlflow.runName": key_str, "dataset": key[0],
                "method": key[1], "seed": str(key[2]), "git_commit": commit, "data_hash": info.get("data_hash", ""),
                "device": info.get("device", ""), "run_dir": str(run_dir)}
        if failure is not None:
            tags["cmbench.error"] = failure["error"][:5000]
        started, ended = _run_times(run_dir)
        run = client.create_run(exp_id, start_time=started, tags=tags)
        run_id = run.info.run_id
        params = _flatten({k: v for k, v in config.items()})
        params.update({f"run_info.{k}": str(v) for k, v in info.items()})
        batch = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            client.log_batch(run_id, params=batch[i:i + 100])
        metrics = []
        for row in run_dir.read_stats():
            for name, value in row.items():
                if name != "step" and isinstance(value, int | float):
                    metrics.append(Metric(f"train/{name}", float(value), 0, int(row["step"])))
        for m in by_run.get(key, []):
            for name, value in m["metrics"].items():
                metrics.append(Metric(f"eval/{name}", float(value), 0, int(m["nfe"])))
                metrics.append(Metric(f"{name}_nfe{m['nfe']}", float(value), 0, 0))
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for f in (run_dir.config, run_dir.stats, run_dir.run_info, run_dir.failure):
            if f.exists():
                client.log_artifact(run_id, str(f), "run")
        for f in metric_paths[key]:
            client.log_artifact(run_id, str(f), "metrics")
        for f in grid_paths[key]:
            client.log_artifact(run_id, str(f), "samples")
        status = "FAILED" if failure is not None else "FINISHED"
        client.set_terminated(run_id, status, end_time=ended)
        ids[key_str] = run_id
        log(f"{key_str}: logged to MLflow run {run_id}" + (f" as FAILED ({failure['error']})" if failure else ""))
    if summary_files:
        ids["summary"] = _log_summary(client, exp_id, list(map(Path, summary_files)), commit, log)
    return exp_id, ids


def _log_summary(client, exp_id: str, files: list[Path], commit: str, log) -> str:
    """The tables and plots of results/summary, as one MLflow run of their own."""
    fingerprint = _fingerprint(files)
    existing = client.search_runs([exp_id], filter_string=f"tags.`{KEY_TAG}` = 'summary'")
    for r in existing:
        if r.data.tags.get(FINGERPRINT_TAG) == fingerprint:
            return r.info.run_id
        client.delete_run(r.info.run_id)
    run = client.create_run(exp_id, tags={KEY_TAG: "summary", FINGERPRINT_TAG: fingerprint, "mlflow.runName": "summary",
                                          "git_commit": commit})
    for f in files:
        client.log_artifact(run.info.run_id, str(f), "summary")
    client.set_terminated(run.info.run_id, "FINISHED")
    log(f"summary: logged to MLflow run {run.info.run_id}")
    return run.info.run_id

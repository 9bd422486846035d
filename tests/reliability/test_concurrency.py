"""Concurrency: 8 processes writing metrics files at the same moment, then MLflow ingestion into the real sqlite
store, loses or duplicates no metric; a second Snakemake on the same folder is refused by Snakemake's lock."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.config import load_config, resolve_run, to_dict
from common.fsutil import atomic_write_text
from core.gmm import GaussianMixture
from tests.reliability.conftest import ROOT, env

WRITERS = 8
SEEDS, STEPS = (0, 1), (1, 2, 3, 4)  # 2 runs x 4 step counts = 8 metrics files


# Each writer is a real `cmbench evaluate` process: it imports everything, then waits at a file barrier so that
# all 8 score and write at the same moment. Subprocesses, not fork: forking a process that already runs torch's
# thread pools can deadlock (it hung this suite twice).
_WRITER = """
import sys, time
from pathlib import Path
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
from common.cli import main
ready.touch()
end = time.monotonic() + 300
while not go.exists():
    if time.monotonic() > end:
        sys.exit("writer: the start file never appeared")
    time.sleep(0.01)
sys.exit(main(sys.argv[3:]))
"""


def _run_at_once(jobs: list[list[str]], tmp_path: Path, timeout: float = 600) -> list[tuple[int, str]]:
    """Start one writer per job, release them together once all are ready; (exit code, output) of each."""
    go, ready = tmp_path / "go", [tmp_path / f"ready{i}" for i in range(len(jobs))]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(r), str(go), *argv], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r, argv in zip(ready, jobs, strict=True)]
    try:
        end = time.monotonic() + timeout
        while not all(r.exists() for r in ready) and time.monotonic() < end:
            if any(p.poll() is not None for p in procs):
                break  # a writer died before the barrier: its output says why
            time.sleep(0.05)
        go.touch()
        results = []
        for p in procs:
            out = p.communicate(timeout=max(1.0, end - time.monotonic()))[0]
            results.append((p.returncode, out))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_eight_concurrent_writers_then_ingest_lose_nothing(config_file, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient

    from common.tracking import ingest

    config = load_config(config_file)
    gmm = GaussianMixture.from_spec(config.datasets["pts"].data.gmm)
    jobs, run_dirs = [], []
    for seed in SEEDS:
        run = resolve_run(config, "pts", "teacher", seed)
        run_dir = tmp_path / "runs" / f"seed{seed}"
        atomic_write_text(run_dir / "config.json", run.to_json())
        run_dirs.append(run_dir)
        for steps in STEPS:
            points = gmm.sample(64, generator=torch.Generator().manual_seed(100 * seed + steps)).float().numpy()
            meta = {"run": to_dict(run), "run_dir": str(run_dir), "steps": steps, "nfe": 2 * steps - 1,
                    "sample_seed": 0, "weights": "ema", "start_sigma": 80.0}
            samples = tmp_path / "samples" / f"seed{seed}-steps{steps}.npz"
            samples.parent.mkdir(parents=True, exist_ok=True)
            np.savez(samples, samples=points, meta=np.array(json.dumps(meta)))
            out = tmp_path / "metrics" / f"seed{seed}" / f"steps{steps}.json"
            jobs.append(["evaluate", "--samples", str(samples), "--out", str(out), "--device", "cpu"])
    assert len(jobs) == WRITERS

    results = _run_at_once(jobs, tmp_path)
    assert [code for code, _ in results] == [0] * WRITERS, [out[-2000:] for code, out in results if code]

    files = sorted((tmp_path / "metrics").rglob("*.json"))
    assert len(files) == WRITERS and not list((tmp_path / "metrics").rglob("*.tmp"))
    written = {}  # (seed, nfe, metric) -> value, from the files
    for f in files:
        m = json.loads(f.read_text())
        for name, value in m["metrics"].items():
            written[(m["seed"], m["nfe"], name)] = float(value)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _attempt in range(2):  # the second ingestion of unchanged files must change nothing
        _, ids = ingest(run_dirs, files, [], [], uri, "concurrency", str(tmp_path / "artifacts"), log=lambda m: None)
    client = MlflowClient(uri)
    found, lost, duplicated = 0, [], []
    for seed in SEEDS:
        run_id = ids[f"pts/teacher/seed{seed}"]
        names = {name for (s, _, name) in written if s == seed}
        for name in names:
            history = client.get_metric_history(run_id, f"eval/{name}")
            by_nfe = {}
            for point in history:
                by_nfe.setdefault(point.step, []).append(point.value)
            for steps in STEPS:
                nfe = 2 * steps - 1
                values = by_nfe.get(nfe, [])
                flat = client.get_metric_history(run_id, f"{name}_nfe{nfe}")
                if not values or not flat:
                    lost.append((seed, nfe, name))
                elif len(values) > 1 or len(flat) > 1:
                    duplicated.append((seed, nfe, name))
                else:
                    assert values[0] == flat[0].value == written[(seed, nfe, name)]
                    found += 1
    assert len(client.search_runs([client.get_experiment_by_name("concurrency").experiment_id])) == len(SEEDS)
    assert (lost, duplicated) == ([], [])
    assert found == len(written)
    print(f"{WRITERS} concurrent writers, {len(written)} metrics written, {found} in MLflow, lost {len(lost)}, "
          f"duplicated {len(duplicated)}")


def _copy_repo(dest: Path) -> None:
    from tests.test_workflow import _copy_repo as copy_like_a_clone

    copy_like_a_clone(dest)


LOCK_REFUSALS = ("LockException", "Directory cannot be locked")


def _finished_files(root: Path) -> set[Path]:
    """What a run has written for good: not in-flight temporaries, not rolling checkpoints (pruned by design)."""
    if not root.is_dir():
        return set()
    return {p for p in root.rglob("*") if p.is_file() and not p.name.startswith((".", "ckpt-"))}


def _snakemake_and_a_clone(tmp_path: Path) -> tuple[Path, Path]:
    """The venv's snakemake and a fresh-clone copy of the repo to run it in."""
    snakemake = Path(sys.executable).parent / "snakemake"
    if not snakemake.exists():
        pytest.skip("snakemake is not installed in this environment")
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repo(repo)
    return snakemake, repo


def test_second_snakemake_on_the_same_folder_is_refused_by_the_lock(tmp_path):
    snakemake, repo = _snakemake_and_a_clone(tmp_path)
    cmd = [str(snakemake), "--cores", "1", "all", "--configfile", "config/smoke.yaml"]
    first = subprocess.Popen(cmd, cwd=repo, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own process group: we stop exactly it and its jobs
    try:
        locks, in_flight = repo / ".snakemake" / "locks", repo / ".snakemake" / "incomplete"
        end = time.monotonic() + 300
        # wait for the lock and a job in flight (the case that matters: outputs half-written right now)
        while not all(d.is_dir() and any(d.iterdir()) for d in (locks, in_flight)):
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < end, "first snakemake never took its lock and started a job"
            time.sleep(0.2)
        before = _finished_files(repo / "results")
        # Plain rerun: refused. Snakemake checks for incomplete outputs before it takes the lock, so once the first
        # run has a job in flight the refusal names those files (IncompleteFilesException); before that, the lock.
        plain = subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True, timeout=300)
        text = plain.stdout + plain.stderr
        assert plain.returncode != 0, text[-3000:]
        assert any(s in text for s in (*LOCK_REFUSALS, "IncompleteFilesException")), text[-3000:]
        # --rerun-incomplete would redo the first run's in-flight jobs over its files: the lock must refuse it.
        rerun = subprocess.run(cmd + ["--rerun-incomplete"], cwd=repo, env=env(), capture_output=True, text=True,
                               timeout=300)
        text = rerun.stdout + rerun.stderr
        assert rerun.returncode != 0, text[-3000:]
        assert any(s in text for s in LOCK_REFUSALS), text[-3000:]
        assert first.poll() is None  # the first run goes on, untouched
        assert before <= _finished_files(repo / "results")  # nothing it had written was removed
        for refused in (plain, rerun):
            assert "Select jobs to execute" not in refused.stdout + refused.stderr  # refused before scheduling
        print("second snakemake refused: " + next(ln for ln in text.splitlines() if "lock" in ln.lower())
              + " (without --rerun-incomplete: " + next(s for s in (*LOCK_REFUSALS, "IncompleteFilesException")
                                                         if s in plain.stdout + plain.stderr) + ")")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)


def test_a_dry_run_with_another_config_beside_a_running_workflow_changes_nothing(tmp_path):
    """Every invocation writes its merged config under its own content hash (workflows/common.smk), so a dry run
    with another config while a workflow trains neither rewrites the file its jobs read nor makes a later job
    train (or `--archive-stale` aside) a run with the other config."""
    snakemake, repo = _snakemake_and_a_clone(tmp_path)
    runs = [f"results/runs/gmm/{m}/seed0" for m in ("teacher", "ct", "ict")]
    cmd = [str(snakemake), "--cores", "1", "-p", *[f"{r}/final.pt" for r in runs], "--configfile",
           "config/smoke.yaml"]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen(cmd, cwd=repo, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + 300
        while not (match := re.search(r" --config (\S+) ", log.read_text())):  # a job is in flight: its command
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < end, "the workflow never started a job"
            time.sleep(0.1)
        ours = repo / match.group(1)
        before = ours.read_bytes()
        dry = subprocess.run([str(snakemake), "-n", "--cores", "1", "all", "--configfile", "config/config.yaml"],
                             cwd=repo, env=env(), capture_output=True, text=True, timeout=300)
        assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
        assert ours.read_bytes() == before, "the dry run rewrote the config file the running jobs read"
        first.wait(timeout=600)
        out = log.read_text()
        assert first.returncode == 0, out[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
    # every job of the running workflow read that file, and each run folder holds the smoke config's run
    assert out.count(f" --config {match.group(1)} ") == out.count(" -m common.cli ") > 0, out[-3000:]
    smoke = load_config(repo / "config/smoke.yaml")
    for run in runs:
        got = json.loads((repo / run / "config.json").read_text())
        assert got == to_dict(resolve_run(smoke, "gmm", run.split("/")[3], 0)), run
    assert not list((repo / "results/runs/gmm").glob("*/seed0.replaced-*"))  # nothing was archived aside

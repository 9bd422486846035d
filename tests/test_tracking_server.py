"""MLflow server and UI, DVC remote: a several-method workflow (config/smoke_methods.yaml) run once through
`dvc repro` and pushed to the default local remote; then

- `mlflow server` on loopback against the run's sqlite store: every method's run and metrics through the REST API,
  and the runs comparison page in headless Chromium (Debian `chromium`, driven by playwright) naming every run;
- a fresh git clone: `dvc pull`, `dvc repro` regenerate the tables with no training job and no new checkpoint.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.test_workflow import BIN, _copy_repo, _env, _run

CONFIG = "config/smoke_methods.yaml"
RUN_NAMES = {"gmm/teacher/seed0", "gmm/cd/seed0", "gmm/sct/seed0"}
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def pushed_repo(tmp_path_factory):
    """A repo copy whose workflow ran through `dvc repro`, with dvc.lock committed and the outputs pushed to the
    default remote (the sibling folder cmbench-dvc-store, .dvc/config)."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    repo.mkdir()
    _copy_repo(repo)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("config/smoke.yaml", CONFIG))
    log = _run(["dvc", "repro"], repo)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    _run([*git, "add", "params.yaml", "dvc.lock"], repo)
    _run([*git, "commit", "-qm", "run"], repo)
    log += _run(["dvc", "push"], repo)
    return repo, log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict | str:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return json.loads(text) if body is not None else text


@pytest.fixture
def mlflow_server(pushed_repo):
    """`mlflow server` on a free loopback port against the workflow's store; stopped by its own process group."""
    repo, _ = pushed_repo
    record = json.loads((repo / "results/tracking/mlflow.json").read_text())
    port = _free_port()
    log = open(repo / "results/mlflow-server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", record["tracking_uri"],
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=repo, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(f"{url}/health").strip() == "OK":
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"mlflow server exited: {(repo / 'results/mlflow-server.log').read_text()}"
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(1)
        yield url, record
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker: the group this fixture started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_mlflow_server_serves_every_method_run_and_the_comparison_page(mlflow_server, tmp_path):
    url, record = mlflow_server
    exp_id = record["experiment_id"]
    found = _get(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "max_results": 100})
    runs = {r["info"]["run_name"]: r for r in found["runs"]}
    assert set(runs) == RUN_NAMES | {"summary"}
    for name in RUN_NAMES:
        run = runs[name]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert run["info"]["status"] == "FINISHED"
        assert {"energy_distance_nfe1", "nll_nfe1", "train/loss"} <= set(metrics), sorted(metrics)
        assert all(map(pd.notna, metrics.values()))
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["method"] == name.split("/")[1]

    playwright = pytest.importorskip("playwright.sync_api")
    _ensure_chromium()
    ids = [runs[n]["info"]["run_id"] for n in sorted(RUN_NAMES)]
    compare = (f"{url}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
               f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}")
    shots = {"runs": (f"{url}/{record['ui_path']}", tmp_path / "mlflow-runs.png"),
             "compare": (compare, tmp_path / "mlflow-compare.png")}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            for name, (address, png) in shots.items():
                page.goto(address)
                for run_name in sorted(RUN_NAMES):  # the UI polls: wait for text, never for networkidle
                    page.get_by_text(run_name).first.wait_for(timeout=90_000)
                page.screenshot(path=str(png), full_page=True)
                text = page.inner_text("body")
                assert not [n for n in RUN_NAMES if n not in text], f"the {name} page lacks run names"
                assert png.stat().st_size > 20_000
                print(f"screenshot of the MLflow {name} page: {png}")
        finally:
            browser.close()
    if os.environ.get("CMBENCH_SCREENSHOT_DIR"):  # CI keeps the pictures where it collects artifacts
        for _, png in shots.values():
            shutil.copy2(png, Path(os.environ["CMBENCH_SCREENSHOT_DIR"]) / png.name)


def _ensure_chromium() -> None:
    """Debian's chromium, installed here when missing and we are root (CI); skipped otherwise."""
    if CHROMIUM.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("needs Debian's chromium: apt-get install -y chromium (as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, check=True, capture_output=True,
                   timeout=900)


def test_dvc_pull_in_a_fresh_clone_regenerates_tables_without_training(pushed_repo, tmp_path):
    repo, _ = pushed_repo
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "results").exists()  # git carries no results: they come from the DVC remote
    _run(["dvc", "remote", "modify", "--local", "local", "url", str(repo.parent / "cmbench-dvc-store")], clone)
    _run(["dvc", "pull"], clone)
    finals = sorted(p.relative_to(clone) for p in clone.glob("results/runs/*/*/seed*/final.pt"))
    assert {str(p.parent.parent.name) for p in finals} == {n.split("/")[1] for n in RUN_NAMES}
    # DVC checks files out in no particular order and Snakemake compares mtimes: mark the pulled outputs up to
    # date once, in the graph's order (the README's fresh-clone step).
    _run([str(BIN / "snakemake"), "--touch", "--cores", "1", "all", "--configfile", CONFIG], clone)
    assert "up to date" in _run(["dvc", "status"], clone)  # the pulled clone is the pushed state
    stamps = {p: (clone / p).stat().st_mtime_ns for p in finals}
    checkpoints = sorted(str(p.relative_to(clone)) for p in clone.glob("results/runs/**/checkpoints/*"))
    shutil.rmtree(clone / "results/summary")
    log = _run(["dvc", "repro"], clone)
    assert "rule sample" in log and "rule report" in log  # the tables were regenerated from the pulled runs ...
    assert "rule train" not in log and "rule prepare" not in log  # ... with no training or data job
    assert {p: (clone / p).stat().st_mtime_ns for p in finals} == stamps
    assert sorted(str(p.relative_to(clone)) for p in clone.glob("results/runs/**/checkpoints/*")) == checkpoints
    quality = ["dataset", "method", "seed", "nfe", "metric", "value"]  # wall-time columns differ, numbers must not
    pd.testing.assert_frame_equal(pd.read_csv(clone / "results/summary/results.csv")[quality],
                                  pd.read_csv(repo / "results/summary/results.csv")[quality])
    assert (clone / "results/summary/metrics.json").read_text() == (repo / "results/summary/metrics.json").read_text()
    assert "up to date" in _run(["dvc", "status"], clone)

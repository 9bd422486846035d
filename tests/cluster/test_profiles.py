"""The profiles as users invoke them: `snakemake --profile slurm all` finds ./slurm/config.yaml from the repo root
and plans every rule with the profile's resources; the profile names only real rules and leaves training's GPU
count to the config. Needs no cluster (a dry run)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_workflow import _copy_repo, _env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _rule_names() -> set[str]:
    text = "".join(p.read_text() for p in (ROOT / "workflows").glob("*.smk"))
    return set(re.findall(r"^rule (\w+):", text, flags=re.M))


def test_slurm_profile_names_real_rules_and_resumes():
    profile = yaml.safe_load((ROOT / "slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1 and profile["slurm-requeue"] is True
    rules = profile["set-resources"]
    assert set(rules) <= _rule_names(), set(rules) - _rule_names()
    for rule in rules:  # GPUs come from the config: train.devices x train.nodes, and workflow.eval_device
        assert "gpu" not in rules[rule] and "gres" not in rules[rule], rule
    for train in ("train_teacher", "train_method"):
        # no `B:`: the signal must reach the job step's processes (the trainer), not only the batch shell
        assert re.fullmatch(r"'--signal=USR1@\d+'", rules[train]["slurm_extra"])
        assert rules[train]["runtime"] * 60 > int(rules[train]["slurm_extra"].split("@")[1].rstrip("'"))


@pytest.mark.slow
def test_profiles_are_found_by_the_users_commands(tmp_path):
    _copy_repo(tmp_path)
    for profile in ("slurm", "profiles/local"):
        proc = subprocess.run([str(BIN / "snakemake"), "--profile", profile, "all", "-n", "--configfile",
                               "config/smoke.yaml"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        if profile == "slurm":
            train = out[out.index("rule train_teacher:"):]
            train = train[:train.index("\n\n")]
            assert "slurm_extra=--signal=USR1@300" in train and "runtime=1440" in train and "cpus_per_task=8" in train
        assert "This was a dry-run" in out

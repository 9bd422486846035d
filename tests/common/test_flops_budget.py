"""Equal-compute mode (train.flops_budget): derived iterations, exact resume, total cost with the teacher's training."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from common import checkpoint
from common import train as train_module
from common.config import config_from_data, load_config, resolve_run, to_dict
from common.models import load_trained
from common.report import compute_table, reports, tidy, training_mode
from common.train import train
from core.errors import ConfigError

CONFIG = """
datasets:
  pts:
    data:
      kind: gmm
      n_train: 512
      gmm: {means: [[0.5, 0.0], [-0.5, 0.0]], stds: [0.1, 0.1], weights: [0.5, 0.5]}
    network: {kind: mlp, hidden: 32, depth: 2}
    train: {iterations: 7, batch_size: 64, lr: 2e-3, ema_halflife_kimg: 0.5, log_every: 5,
            checkpoint_every: 5, keep_checkpoints: 5, device: cpu}
methods: {teacher: {}, ict: {}, cd: {}}
"""
BUDGET = 1.5e8  # about 50 teacher iterations of this tiny MLP at batch 64 (3.1e6 FLOPs each)


def _run(tmp_path, method, **train):
    data = yaml.safe_load(CONFIG)
    data["datasets"]["pts"]["train"].update(train)
    return resolve_run(config_from_data(data, "t.yaml"), "pts", method, 0)


def quiet(msg):
    pass


def _info(out) -> dict:
    return json.loads((Path(out) / "run_info.json").read_text())


def test_the_budget_sets_each_methods_iterations_from_its_flops_per_iteration(tmp_path):
    infos = {}
    for method in ("teacher", "ict"):
        messages = []
        train(_run(tmp_path, method, flops_budget=BUDGET), tmp_path / method, progress_bar=False,
              log=messages.append)
        infos[method] = info = _info(tmp_path / method)
        per_iter, n = info["train_flops_per_iter"], info["iterations"]
        assert n == max(1, math.floor(BUDGET / per_iter)) and info["flops_budget"] == BUDGET
        assert BUDGET - per_iter < info["train_flops_total"] <= BUDGET  # within one iteration of the budget
        assert any(f"-> {n} iterations (train.iterations 7 is ignored)" in m for m in messages)
        assert checkpoint.load(tmp_path / method / "final.pt")["step"] == n
        assert json.loads((tmp_path / method / "stats.jsonl").read_text().splitlines()[-1])["step"] == n
        # the count is the one run_info has always held: the same function at the same batch
        train(_run(tmp_path, method), tmp_path / f"{method}-plain", progress_bar=False, log=quiet)
        assert _info(tmp_path / f"{method}-plain")["train_flops_per_iter"] == per_iter
    teacher, ict = infos["teacher"], infos["ict"]
    assert ict["train_flops_per_iter"] > 1.2 * teacher["train_flops_per_iter"]  # two network calls, not one
    assert ict["iterations"] < teacher["iterations"]
    # the config record names the budget; without one it is left out (old run records keep their hash)
    assert json.loads((tmp_path / "teacher" / "config.json").read_text())["train"]["flops_budget"] == BUDGET
    assert "flops_budget" not in json.loads((tmp_path / "teacher-plain" / "config.json").read_text())["train"]


def test_a_resumed_budget_run_keeps_its_count_and_is_bitwise_the_uninterrupted_run(tmp_path, monkeypatch):
    run = _run(tmp_path, "ict", flops_budget=BUDGET)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(run, full, progress_bar=False, log=quiet)
    n = _info(full)["iterations"]
    train(run, cut, progress_bar=False, log=quiet)
    steps = [s for s, _ in checkpoint.list_steps(cut / "checkpoints")]
    assert checkpoint.load(cut / "checkpoints" / f"ckpt-{steps[0]:08d}.pt")["budget"]["iterations"] == n
    for name in ("final.pt", "final.pt.sha256", "run_info.json"):
        (cut / name).unlink()
    for step in steps[1:]:
        checkpoint.step_path(cut / "checkpoints", step).unlink()
    # a FLOP counter that now counts otherwise (another torch version) must not change a started run's length
    counted = train_module._iteration_flops
    monkeypatch.setattr(train_module, "_iteration_flops", lambda tr, b: 2 * counted(tr, b))
    messages = []
    train(run, cut, progress_bar=False, log=messages.append)
    assert f"resumed from step {steps[0]}" in messages
    assert any(f"keeping the run's {n} iterations" in m for m in messages)
    assert _info(cut)["iterations"] == n and _info(cut)["train_flops_total"] == _info(full)["train_flops_total"]
    a, b = checkpoint.load(full / "final.pt"), checkpoint.load(cut / "final.pt")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_the_total_cost_adds_the_teachers_training_for_a_method_built_on_it(tmp_path):
    """CD starts from the teacher's weights (on gmm it distills the exact mixture): its total is its own training
    plus the teacher run's; the teacher's and iCT's (random init) are their own."""
    from common.compute import sampling_compute

    train(_run(tmp_path, "teacher"), tmp_path / "teacher", progress_bar=False, log=quiet)
    for method in ("cd", "ict"):
        train(_run(tmp_path, method, flops_budget=BUDGET), tmp_path / method, teacher_dir=str(tmp_path / "teacher"),
              progress_bar=False, log=quiet)
    teacher_total = _info(tmp_path / "teacher")["train_flops_total"]
    assert _info(tmp_path / "cd")["teacher_flops_total"] == teacher_total
    assert _info(tmp_path / "ict")["teacher_flops_total"] == 0  # from scratch
    assert _info(tmp_path / "teacher")["teacher_flops_total"] == 0
    files = []
    for method in ("teacher", "cd", "ict"):
        run, m, model, shape = load_trained(tmp_path / method, torch.device("cpu"))
        record = {"dataset": "pts", "method": method, "seed": 0, "steps": 1, "nfe": m.nfe(1), "sample_seed": 0,
                  "n_samples": 100, "weights": "ema", "metrics": {"energy_distance": 0.01},
                  "protocol": {"metric_family": "exact (analytic mixture)", "n_samples": 100},
                  "compute": sampling_compute(tmp_path / method, m, model, shape, 1, torch.device("cpu"), 0, 1e-3)}
        files.append(tmp_path / f"{method}.json")
        files[-1].write_text(json.dumps(record))
    comp = compute_table(tidy(files)).set_index("method")
    own = {m: _info(tmp_path / m)["train_flops_total"] for m in ("teacher", "cd", "ict")}
    assert comp.loc["cd", "teacher_flops_total"] == teacher_total
    assert comp.loc["cd", "total_flops"] == own["cd"] + teacher_total
    assert comp.loc["ict", "total_flops"] == own["ict"] and comp.loc["teacher", "total_flops"] == own["teacher"]
    md, tex = reports(tidy(files))
    mode = "equal compute: 1.5e8 FLOPs of training per method (teacher: the configured iterations)"
    assert f"training mode: {mode}" in md and "total PFLOP incl. teacher" in md
    assert "equal compute: 1.5e8 FLOPs of training per method" in tex


def test_the_footer_names_the_mode_of_older_records_as_equal_iterations():
    import pandas as pd

    rows = pd.DataFrame({"method": ["teacher", "cd"], "seed": [0, 0], "flops_budget": [None, None]})
    assert training_mode(rows) == "equal iterations (per-method budgets from the config)"
    assert training_mode(rows.drop(columns="flops_budget")) == "equal iterations (per-method budgets from the config)"


@pytest.mark.parametrize("value", [0, -1.0e12, "lots", ".nan"])
def test_a_bad_flops_budget_is_a_one_line_error(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.replace("device: cpu}", f"device: cpu, flops_budget: {value}}}"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "datasets.pts.train.flops_budget" in str(e.value) and "\n" not in str(e.value)


def test_the_quick_tracks_equal_compute_budget_leaves_the_default_and_the_teacher_untouched():
    data = yaml.safe_load((Path(__file__).resolve().parents[2] / "config/config.yaml").read_text())
    plain, equal = config_from_data(data, "c"), config_from_data({**data, "budget": "equal_compute"}, "c")
    for dataset in ("gmm", "digits"):
        budgets = set()
        for method in plain.methods:
            a, b = resolve_run(plain, dataset, method, 0), resolve_run(equal, dataset, method, 0)
            assert a.train.flops_budget is None and "flops_budget" not in to_dict(a.train)
            if method == "teacher":
                assert to_dict(a) == to_dict(b)  # the same run: reused, not retrained
            else:
                budgets.add(b.train.flops_budget)
        assert len(budgets) == 1 and budgets.pop() > 0


@pytest.mark.slow  # about 40 s: torchrun starts two processes
def test_data_parallel_ranks_train_the_same_derived_count_as_one_process(tmp_path):
    """Budget 2e7 at batch 16 as 2 gloo processes (devices 2) and as 1 process x 2 micro-batches of 8: the same
    derived iteration count and, as without a budget (tests/common/test_distributed.py), the same weights."""
    import os
    import shlex
    import subprocess
    import sys

    from common import distributed

    root = Path(__file__).resolve().parents[2]
    config = """
datasets:
  gmm:
    data: {kind: gmm, n_train: 256, gmm: {means: [[0.5, 0.0], [-0.5, 0.0]], stds: [0.1, 0.1], weights: [0.5, 0.5]}}
    network: {kind: mlp, hidden: 16, depth: 2, dropout: 0.2}
    train: {iterations: 4, batch_size: 16, lr: 1.0e-2, log_every: 2, checkpoint_every: 2, device: cpu,
            flops_budget: 2.0e6, TRAIN}
methods:
  ict: {}
"""
    paths = {}
    for name, train_keys in {"micro": "batch_per_gpu: 8", "devices": "devices: 2"}.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(config.replace("TRAIN", train_keys))
    train(resolve_run(load_config(paths["micro"]), "gmm", "ict", 0), tmp_path / "micro", progress_bar=False,
          log=quiet)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    env.pop("WORLD_SIZE", None)
    cmd = [*shlex.split(distributed.launch_prefix(sys.executable, 2)), "train", "--config", str(paths["devices"]),
           "--dataset", "gmm", "--method", "ict", "--seed", "0", "--out", str(tmp_path / "devices")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _info(tmp_path / "micro"), _info(tmp_path / "devices")
    assert one["iterations"] == two["iterations"] > 4 and one["train_flops_per_iter"] == two["train_flops_per_iter"]
    a, b = checkpoint.load(tmp_path / "micro" / "final.pt"), checkpoint.load(tmp_path / "devices" / "final.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

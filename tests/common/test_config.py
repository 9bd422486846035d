"""Config: YAML -> typed dataclasses; bad input names the key and the file; resolved config round-trips."""

import json
from pathlib import Path

import pytest
import yaml

from common.config import Config, RunConfig, config_from_data, from_dict, load_config, resolve_run, to_dict
from core.errors import ConfigError

MINIMAL = """
datasets:
  pts:
    data:
      kind: gmm
      gmm: {means: [[0.0, 0.0], [1.0, 1.0]], stds: [0.1, 0.2], weights: [0.5, 0.5]}
    network: {kind: mlp}
    train: {iterations: 10, lr: 1e-4}
methods:
  teacher:
    params: {P_mean: -1.0}
    train: {batch_size: 64}
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_and_types(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, Config)
    entry = cfg.datasets["pts"]
    assert entry.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: converted
    assert entry.data.gmm.stds == [0.1, 0.2]
    assert entry.network.kind == "mlp"


@pytest.mark.parametrize("bad, key", [
    ("    train: {iterations: 10, lrr: 1e-4}", "datasets.pts.train.lrr"),
    ("    train: {iterations: -3}", "datasets.pts.train.iterations"),
    ("    train: {iterations: ten}", "datasets.pts.train.iterations"),
    ("    train: {optimizer: sgd}", "datasets.pts.train.optimizer"),
])
def test_bad_key_or_value_names_key_and_file(tmp_path, bad, key):
    text = MINIMAL.replace("    train: {iterations: 10, lr: 1e-4}", bad)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert key in msg and str(path) in msg and "\n" not in msg


def test_bad_gmm_weights(tmp_path):
    text = MINIMAL.replace("weights: [0.5, 0.5]", "weights: [0.5, 0.6]")
    with pytest.raises(ConfigError, match=r"datasets\.pts\.data\.gmm\.weights: must sum to 1"):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "datasets: [unclosed"))


def test_resolve_merges_overrides_and_validates_method_params(tmp_path):
    path = write(tmp_path, MINIMAL)
    run = resolve_run(load_config(path), "pts", "teacher", 3, source=str(path))
    assert run.train.batch_size == 64 and run.train.iterations == 10
    assert run.method_params["P_mean"] == -1.0 and run.method_params["P_std"] == 1.2  # paper default kept
    assert run.seed == 3
    bad = MINIMAL.replace("P_mean: -1.0", "P_meen: -1.0")
    path = write(tmp_path, bad, "bad.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'methods\.teacher\.params\.P_meen'"):
        resolve_run(load_config(path), "pts", "teacher", 0, source=str(path))


def test_unknown_method_and_dataset(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ConfigError, match=r"unknown method 'ict2'.*available: .*teacher"):
        resolve_run(cfg, "pts", "ict2", 0)
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'"):
        resolve_run(cfg, "cifar", "teacher", 0)


def test_override_with_bad_key_is_named(tmp_path):
    text = MINIMAL.replace("train: {batch_size: 64}", "train: {batch_sise: 64}")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"methods\.teacher\.train\.batch_sise"):
        resolve_run(load_config(path), "pts", "teacher", 0, source=str(path))


def test_run_config_json_round_trip(tmp_path):
    run = resolve_run(load_config(write(tmp_path, MINIMAL)), "pts", "teacher", 1)
    data = json.loads(run.to_json())
    back = from_dict(RunConfig, data)
    assert to_dict(back) == to_dict(run)


def test_shipped_configs_load_with_every_budget():
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "config").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        for budget in [None, *(data.get("budgets") or {})]:
            cfg = config_from_data({**data, "budget": budget}, path.name)
            for ds in cfg.datasets:
                for m in cfg.methods:
                    resolve_run(cfg, ds, m, 0, source=path.name)


BUDGETS = MINIMAL + """
budgets:
  cpu:
    seeds: [0, 1]
    datasets: {pts: {train: {iterations: 3}}}
"""


def test_budget_merges_over_the_file_and_unknown_budget_is_named(tmp_path):
    base = load_config(write(tmp_path, BUDGETS))
    assert base.seeds == [0] and base.datasets["pts"].train.iterations == 10
    cpu = load_config(write(tmp_path, BUDGETS + "budget: cpu\n"))
    assert cpu.seeds == [0, 1] and cpu.datasets["pts"].train.iterations == 3
    assert cpu.datasets["pts"].train.lr == 1e-4  # untouched keys stay
    with pytest.raises(ConfigError, match="unknown budget 'gpu' \\(defined here: cpu\\)"):
        load_config(write(tmp_path, BUDGETS + "budget: gpu\n"))
    with pytest.raises(ConfigError, match="unknown key 'datasets.pts.train.iters'"):
        load_config(write(tmp_path, BUDGETS.replace("iterations: 3", "iters: 3") + "budget: cpu\n"))

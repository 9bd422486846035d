"""The mixture suite's table: energy distance relative to the same mixture's teacher (raised to the real-vs-real
floor), median and quartiles per set; development and held-out mixtures never mixed."""

import pandas as pd
import pytest

from common.config import DataSpec
from common.report import _method_order
from common.suite import suite_markdown, suite_table
from core.mixture_suite import DEVELOPMENT_SEEDS, HELD_OUT_SEEDS, mixture_set, mixture_spec


def _rows(dataset, mixture_set_, teacher_ed, cd_ed, floor, tv=0.02):
    base = {"dataset": dataset, "seed": 0, "protocol_mixture_set": mixture_set_}
    return [
        {**base, "method": "teacher", "nfe": 35, "metric": "energy_distance", "value": teacher_ed},
        {**base, "method": "teacher", "nfe": 1, "metric": "energy_distance", "value": 10 * teacher_ed},
        {**base, "method": "cd", "nfe": 1, "metric": "energy_distance", "value": cd_ed},
        {**base, "method": "cd", "nfe": 1, "metric": "energy_distance_real", "value": -floor},
        {**base, "method": "cd", "nfe": 1, "metric": "mode_weight_tv", "value": tv},
        {**base, "method": "cd", "nfe": 1, "metric": "nll", "value": 1.0},
    ]


def test_relative_to_each_mixtures_teacher_with_the_floor_and_sets_apart():
    df = pd.DataFrame(_rows("d0", "development", 0.002, 0.004, 1e-4) + _rows("d1", "development", 0.001, 0.003, 1e-4)
                      + _rows("h0", "held_out", 0.002, 1e-6, 1e-3, tv=0.1)   # below the floor: counts as the floor
                      + _rows("h1", "held_out", 0.004, 0.004, 1e-4, tv=0.3)
                      + [{"dataset": "ring", "seed": 0, "protocol_mixture_set": None, "method": "cd", "nfe": 1,
                          "metric": "energy_distance", "value": 9.0}])  # not a suite mixture: left out
    table = suite_table(df).set_index(["set", "method", "nfe", "metric"])
    dev = table.loc[("development", "cd", 1, "energy_distance_vs_teacher")]
    assert dev["median"] == pytest.approx(2.5) and dev.n_mixtures == 2  # ratios 2 and 3
    held = table.loc[("held_out", "cd", 1, "energy_distance_vs_teacher")]
    assert held["median"] == pytest.approx((0.5 + 1.0) / 2) and held.q25 == pytest.approx(0.625)  # 1e-3/2e-3, 1
    assert table.loc[("held_out", "teacher", 35, "energy_distance_vs_teacher")]["median"] == pytest.approx(1.0)
    assert table.loc[("held_out", "cd", 1, "mode_weight_tv")]["median"] == pytest.approx(0.2)
    assert "nll" not in set(table.index.get_level_values("metric"))
    md = suite_markdown(suite_table(df), _method_order)
    assert "| cd | 1 | 2.5 [2.25, 2.75] | 0.75 [0.625, 0.875] |" in md and "held-out (n = 2)" in md


def test_no_suite_datasets_give_an_empty_table():
    df = pd.DataFrame([{"dataset": "gmm", "seed": 0, "method": "cd", "nfe": 1, "metric": "energy_distance",
                        "value": 0.1}])
    assert suite_table(df).empty and suite_markdown(suite_table(df), _method_order) == ""


def test_a_mixture_seed_in_the_config_draws_the_suites_mixture():
    spec = DataSpec(kind="gmm", mixture=HELD_OUT_SEEDS[0])
    assert spec.gmm.means == mixture_spec(HELD_OUT_SEEDS[0])["means"] and spec.gmm.covs is not None
    assert mixture_set(DEVELOPMENT_SEEDS[0]) == "development" and mixture_set(HELD_OUT_SEEDS[-1]) == "held_out"
    assert mixture_set(max(HELD_OUT_SEEDS) + 1) is None
    with pytest.raises(Exception, match="only allowed for kind 'gmm'"):
        DataSpec(kind="digits", mixture=0)

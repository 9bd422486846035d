"""The summary: bootstrap intervals, Table-1 layout with CIs, LaTeX escaping, the paper column, compute table."""

import json

import numpy as np
import pandas as pd
import pytest

from common.report import SUMMARY_NAMES, bootstrap_ci, cells, reports, tidy, write_summary


def test_bootstrap_ci_brackets_the_mean_and_matches_the_normal_limit():
    v = np.random.default_rng(1).normal(3.0, 1.0, size=400)
    lo, hi = bootstrap_ci(v)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v))  # for many seeds the percentile bootstrap -> normal interval
    assert lo < v.mean() < hi
    assert abs((hi - lo) / 2 - half) < 0.1 * half
    assert all(np.isnan(bootstrap_ci([1.0])))
    lo2, hi2 = bootstrap_ci([1.0, 3.0])  # two seeds: inside their range
    assert 1.0 <= lo2 <= 2.0 <= hi2 <= 3.0


def _write(tmp_path, dataset, method, seed, nfe, metrics, family="FD-CNN(x)"):
    row = {"dataset": dataset, "method": method, "seed": seed, "steps": nfe, "nfe": nfe, "sample_seed": 0,
           "n_samples": 100, "weights": "ema", "metrics": metrics,
           "protocol": {"metric_family": family, "n_samples": 100, "library": "torch-fidelity 0.4.0"},
           "compute": {"params": 1000, "params_x_nfe": 1000 * nfe, "flops_per_eval": 2e6, "flops_per_sample": 2e6 * nfe,
                       "sec_per_sample": 1e-3 * nfe, "sample_device": "cpu", "train_flops_per_iter": 6e9,
                       "train_flops_total": 6e12, "sec_per_iter": 0.1, "iterations": 1000, "train_device": "cpu"}}
    path = tmp_path / f"{dataset}_{method}_{seed}_{nfe}.json"
    path.write_text(json.dumps(row))
    return path


@pytest.fixture
def files(tmp_path):
    out = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for method in ("teacher", "ict", "sct"):
            for nfe in (1, 2):
                out.append(_write(tmp_path, "cifar10", method, seed, nfe,
                                  {"fd_cnn": 10.0 / nfe + shift, "fid_torch_fidelity": 5.0 / nfe + shift,
                                   "fd_cnn_real": 1.5}))
    return out


def test_tidy_has_one_row_per_metric_and_the_compute_columns(files):
    df = tidy(files)
    assert len(df) == 3 * len(files)
    assert {"params", "params_x_nfe", "train_flops_total", "sec_per_sample"} <= set(df.columns)
    c = cells(df, "cifar10", "fd_cnn")
    ict1 = c[(c.method == "ict") & (c.nfe == 1)].iloc[0]
    assert ict1["mean"] == pytest.approx(11.0) and ict1.n_seeds == 2 and 10.0 <= ict1.lo <= 11.0 <= ict1.hi <= 12.0


def test_tables_have_teacher_first_cis_paper_column_and_escaped_latex(files):
    published = pd.DataFrame([{"dataset": "cifar10", "method": "ict", "nfe": 1, "fid": 2.83, "variant": "",
                               "source": "iCT"}])
    md, tex = reports(tidy(files), published)
    fid_table = md.split("## cifar10: Inception FID (torch-fidelity)")[1].split("##")[0]
    assert "| method | NFE 1 ours | NFE 1 paper | NFE 2 ours | NFE 2 paper |" in fid_table
    assert "| ict | 6 [5, 7] | 2.83 |" in fid_table
    rows = [ln.split("|")[1].strip() for ln in fid_table.strip().splitlines()[2:] if ln.startswith("|")]
    assert rows == ["teacher", "ict", "sct"]
    assert "real-vs-real fd_cnn (real images as the samples, sets as stated): 1.5" in md
    assert "training seeds [0, 1]" in md
    assert "## cifar10: compute" in md
    assert r"\begin{tabular}{lrrrr}" in tex and r"\toprule" in tex and r"fid\_torch" not in tex
    assert "_" not in tex.replace(r"\_", "")  # every underscore escaped


def test_write_summary_writes_every_file(files, tmp_path):
    paths = write_summary(files, tmp_path / "summary")
    assert [p.name for p in paths] == SUMMARY_NAMES
    assert all(p.stat().st_size > 0 for p in paths)
    compute = pd.read_csv(tmp_path / "summary" / "compute.csv")
    assert len(compute) == len(files)

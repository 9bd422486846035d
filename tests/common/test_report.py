"""The summary: bootstrap intervals, Table-1 layout with CIs, LaTeX escaping, the paper column with its footnotes
(the setting of each published number, the departures of each run), compute table."""

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


def _write(tmp_path, dataset, method, seed, nfe, metrics, family="FD-CNN(x)", **protocol):
    row = {"dataset": dataset, "method": method, "seed": seed, "steps": nfe, "nfe": nfe, "sample_seed": 0,
           "n_samples": 100, "weights": "ema", "metrics": metrics,
           "protocol": {"metric_family": family, "n_samples": 100, "library": "torch-fidelity 0.4.0", **protocol},
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
    assert "| ict | 6 [5, 7] | 2.83<sup>a</sup> |" in fid_table  # a: its source ("iCT")
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


def test_gmm_tables_show_nll_only_beside_the_entropy_and_the_mode_metrics(tmp_path):
    """An over-concentrated sampler's NLL is below the entropy H: the tables show NLL - H (with H in the title), never
    NLL alone, and the mode-weight TV and off-mode share with their perfect-sampler values and real-vs-real floors.
    Records from before nll_gap get it from their nll and entropy."""
    files = []
    for method, nll in (("teacher", -1.05), ("cd", -1.80)):
        metrics = {"nll": nll, "entropy": -1.0768, "entropy_se": 0.002, "energy_distance": 0.001,
                   "energy_distance_real": -0.0002, "flow_map_error_mean": 0.03, "mode_weight_tv": 0.02,
                   "mode_weight_tv_real": 0.014, "off_mode_share": 0.012, "off_mode_share_real": 0.0095}
        if method == "cd":
            metrics["nll_gap"] = nll + 1.0768
        files.append(_write(tmp_path, "gmm", method, 0, 1, metrics, "exact (analytic mixture)",
                            off_mode_quantile=0.01))
    df = tidy(files)
    gap = df[df.metric == "nll_gap"].set_index("method").value
    assert gap["teacher"] == pytest.approx(0.0268) and gap["cd"] == pytest.approx(-0.7232)
    md, tex = reports(df)
    titles = [line for line in md.splitlines() if line.startswith("## gmm")]
    assert titles[1] == ("## gmm: NLL - H: NLL under the true mixture minus its entropy H (nats; perfect: 0, below 0: "
                         "over-concentrated; H = -1.0768)")
    assert not any("NLL under" in t and "H" not in t for t in titles)
    assert "| cd | -0.7232 |" in md.split(titles[1])[1]
    assert any(t.startswith("## gmm: mode-weight TV") for t in titles)
    assert any(t.startswith("## gmm: off-mode share") and t.endswith("q = 0.01)") for t in titles)
    assert "real-vs-real mode_weight_tv" in md and "real-vs-real off_mode_share" in md
    assert "true mixture entropy H = -1.0768 +- 0.002 nats" in md and "Lower is better, except" in md
    assert "NLL - H" in tex and "off-mode share" in tex


def _paper_files(tmp_path):
    out = []
    for method in ("teacher", "cd", "ect"):
        for nfe in (1, 2):
            metrics = {"fd_cnn": 9.0 / nfe, "fid_torch_fidelity": 4.0 / nfe}
            out.append(_write(tmp_path, "cifar10", method, 0, nfe, metrics))
    return out


def test_paper_column_marks_each_numbers_setting_and_each_rows_departure(tmp_path):
    """An L2 run never sits unmarked beside an LPIPS number: each paper number carries a letter whose footnote gives
    its source and setting (`variant`), and each method whose run departs from its paper's recipe carries a
    numbered row note (`note`), in Markdown and in LaTeX, in every table of the dataset."""
    rows = [("cd", 1, 3.55, "LPIPS", "CM", "L2 distance, not LPIPS; no x-flips"),
            ("cd", 2, 2.93, "LPIPS", "CM", ""),
            ("ect", 1, 3.86, "", "ECT", ""),
            ("ect", 2, 2.15, "", "ECT", "lr_decay <= 16 & 50%"),
            ("ctm", None, None, "", "CTM", "no GAN"),  # a note alone, for a method without a number or a run here
            ("teacher", None, None, "", "EDM", "no augmentation")]
    published = pd.DataFrame([{"dataset": "cifar10", "method": m, "nfe": n, "fid": f, "variant": v, "source": s,
                               "note": note} for m, n, f, v, s, note in rows])
    md, tex = reports(tidy(_paper_files(tmp_path)), published)
    fid_table = md.split("## cifar10: Inception FID (torch-fidelity)")[1].split("\n\n")[1]
    assert "| teacher<sup>1</sup> | 4 |  | 2 |  |" in fid_table  # note-only rows add no number
    assert "| cd<sup>2</sup> | 4 | 3.55<sup>a</sup> | 2 | 2.93<sup>a</sup> |" in fid_table
    assert "| ect<sup>3</sup> | 4 | 3.86<sup>b</sup> | 2 | 2.15<sup>b</sup> |" in fid_table
    assert "- <sup>a</sup> CM: LPIPS" in md and "- <sup>b</sup> ECT\n" in md + "\n"
    assert "- <sup>2</sup> cd: L2 distance, not LPIPS; no x-flips" in md
    assert "- <sup>3</sup> ect: lr_decay <= 16 & 50%" in md and "ctm" not in md  # no ctm run: no note
    assert md.count("- <sup>2</sup> cd:") == 1  # the row notes once per dataset
    cnn_table = md.split("## cifar10: FD-CNN(cifar10)")[1].split("\n\n")[1]
    assert "| cd<sup>2</sup> | 9 | 4.5 |" in cnn_table and "paper" not in cnn_table  # the same marks on every table
    assert r"cd\textsuperscript{2} & 4 & 3.55\textsuperscript{a} & 2 & 2.93\textsuperscript{a} \\" in tex
    assert r"\textsuperscript{a} CM: LPIPS \\" in tex
    assert r"\textsuperscript{3} ect: lr\_decay \textless{}= 16 \& 50\%" in tex
    assert tex.count(r"\textsuperscript{2} cd: L2 distance") == 2  # under each LaTeX table (floats stand alone)
    # a published file without the note column still works: letters only
    md_old, _ = reports(tidy(_paper_files(tmp_path)), published.drop(columns="note"))
    assert "| cd | 4 | 3.55<sup>a</sup> |" in md_old and "Row notes" not in md_old


def test_the_shipped_published_fids_parse_and_match_our_settings(files):
    """config/published_fid.csv: every number has a source; ECT's CIFAR-10 comparator is its 200k-iteration result
    (our config trains 200k); the CIFAR-10 sCT/sCD 1-step comparators are FastGen's reproduction in our setting
    (EDM's DDPM++ in TrigFlow), the 2-step ones sCM's own network, marked so; the report renders all of it."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "config/published_fid.csv"
    pub = pd.read_csv(path, comment="#")
    assert list(pub.columns) == ["dataset", "method", "nfe", "fid", "variant", "source", "note"]
    numbers = pub[pub.fid.notna()]
    assert numbers.nfe.notna().all() and numbers.source.notna().all()
    assert pub[pub.fid.isna()].note.notna().all()  # a row without a number exists for its note
    fid = {(r.dataset, r.method, int(r.nfe)): r for r in numbers.itertuples()}
    assert (fid["cifar10", "ect", 1].fid, fid["cifar10", "ect", 2].fid) == (3.86, 2.15)
    assert "200k" in fid["cifar10", "ect", 1].variant
    assert (fid["cifar10", "sct", 1].fid, fid["cifar10", "scd", 1].fid) == (3.23, 3.22)
    assert "FastGen" in fid["cifar10", "sct", 1].source and "own TrigFlow" in fid["cifar10", "sct", 2].variant
    assert all("LPIPS" in fid[k].variant for k in fid if k[1] in ("cd", "ct"))
    md, tex = reports(tidy(files), pub)
    assert "2.83<sup>" in md and "Row notes" in md and r"\textsuperscript{a}" in tex

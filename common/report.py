"""Metrics files -> results/summary: tidy CSV, Table-1-shaped Markdown and LaTeX, DVC metrics and plots.

The tidy CSV has one row per (dataset, method, seed, NFE, metric) with the protocol and the compute columns
beside the value, so any table can be rebuilt from it.  The tables follow the papers' Table 1: methods as rows,
NFE as columns, the teacher as the reference row, each cell the mean over training seeds with a 95% bootstrap
confidence interval, and a footer that states the protocol.  On paper tracks a "paper" column shows the
published number beside ours (config/published_fid.csv).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .fsutil import atomic_write_text
from .records import KIND_METRIC, metrics_kind, read_metrics

# The headline metric per dataset kind (lower is better for all of them), and the ones shown in the tables.
PRIMARY = KIND_METRIC  # the metric every metrics file of a dataset kind holds
SHOWN = {"gmm": ["flow_map_error_mean", "nll", "energy_distance"],
         "image": ["fd_cnn", "kid_cnn", "fid_torch_fidelity", "fid_clean_fid"]}
LABELS = {
    "energy_distance": "energy distance to the true mixture",
    "nll": "NLL under the true mixture (nats)",
    "flow_map_error_mean": "mean error vs the exact flow map Phi_{80->0}",
    "fd_cnn": "FD-CNN",
    "kid_cnn": "KID-CNN",
    "fid_torch_fidelity": "Inception FID (torch-fidelity)",
    "fid_clean_fid": "Inception FID (clean-fid)",
}
PAPER_METRIC = "fid_torch_fidelity"  # what published FIDs are shown beside
REFERENCE_METHOD = "teacher"
# Rows in the order of the papers' lineage (CM -> iCT -> ECT -> CTM -> sCM -> FACM); others follow alphabetically.
METHOD_ORDER = ["teacher", "cd", "ct", "ict", "ect", "ctm", "sct", "scd", "facm"]
COMPUTE_COLUMNS = ["params", "params_x_nfe", "flops_per_eval", "flops_per_sample", "sec_per_sample",
                   "sample_device", "train_flops_per_iter", "train_flops_total", "sec_per_iter", "iterations",
                   "train_device"]
SUMMARY_NAMES = ["results.csv", "compute.csv", "table.md", "table.tex", "metrics.json", "quality_vs_nfe.png",
                 "quality_vs_nfe.csv", "quality_vs_sampling_compute.png", "quality_vs_training_compute.png"]
CONFIDENCE = 0.95
N_BOOTSTRAP = 10_000


def tidy(metrics_files: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in metrics_files:
        m = read_metrics(path)
        base = {k: m[k] for k in ("dataset", "method", "seed", "steps", "nfe", "sample_seed", "n_samples", "weights")}
        base.update({f"protocol_{k}": v for k, v in m["protocol"].items() if k != "n_samples"})
        base.update({k: m.get("compute", {}).get(k) for k in COMPUTE_COLUMNS})
        for name, value in m["metrics"].items():
            rows.append({**base, "metric": name, "value": float(value)})
    if not rows:
        raise ValueError("no metrics files given to report")
    df = pd.DataFrame(rows)
    return df.sort_values(["dataset", "method", "seed", "nfe", "metric"], kind="stable").reset_index(drop=True)


def bootstrap_ci(values, level: float = CONFIDENCE, n_boot: int = N_BOOTSTRAP, seed: int = 0):
    """Percentile bootstrap interval of the mean over training seeds; (nan, nan) for a single seed.

    With few seeds the interval is narrow by construction (two seeds span at most their min..max): the
    footer states the number of seeds so a reader can weigh it.
    """
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(v, size=(n_boot, len(v)), replace=True).mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _kind(df: pd.DataFrame, dataset: str) -> str:
    """'gmm' or 'image', from the metrics the dataset's files hold."""
    return metrics_kind(df.loc[df.dataset == dataset, "metric"])


def _method_order(methods) -> list[str]:
    known = [m for m in METHOD_ORDER if m in set(methods)]
    return known + sorted(set(methods) - set(METHOD_ORDER))


def cells(df: pd.DataFrame, dataset: str, metric: str) -> pd.DataFrame:
    """One row per (method, nfe): mean over training seeds, its bootstrap CI and the number of seeds."""
    sub = df[(df.dataset == dataset) & (df.metric == metric)]
    out = []
    for (method, nfe), group in sub.groupby(["method", "nfe"]):
        lo, hi = bootstrap_ci(group.value.to_numpy())
        out.append({"method": method, "nfe": int(nfe), "mean": group.value.mean(), "lo": lo, "hi": hi,
                    "n_seeds": len(group)})
    return pd.DataFrame(out, columns=["method", "nfe", "mean", "lo", "hi", "n_seeds"])


def table(df: pd.DataFrame, dataset: str, metric: str, field: str = "mean") -> pd.DataFrame:
    """Methods x NFE of one field of `cells` (mean by default)."""
    wide = cells(df, dataset, metric).pivot(index="method", columns="nfe", values=field)
    return wide.reindex(_method_order(wide.index))


def _fmt(mean, lo, hi, ci: bool) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.4g}" + (f" [{lo:.3g}, {hi:.3g}]" if ci and not pd.isna(lo) else "")


def _published(published: pd.DataFrame | None, dataset: str) -> pd.DataFrame | None:
    if published is None:
        return None
    sub = published[published.dataset == dataset]
    return sub if len(sub) else None


def _grid(df: pd.DataFrame, dataset: str, metric: str, published: pd.DataFrame | None):
    """Header and rows of one table as strings: methods x NFE (x ours/paper on paper tracks)."""
    c = cells(df, dataset, metric)
    nfes = sorted(c.nfe.unique())
    paper = _published(published, dataset) if metric == PAPER_METRIC else None
    header = ["method"]
    for n in nfes:
        header += [f"NFE {n}"] if paper is None else [f"NFE {n} ours", f"NFE {n} paper"]
    rows = []
    for method in _method_order(c.method.unique()):
        row = [method]
        for n in nfes:
            hit = c[(c.method == method) & (c.nfe == n)]
            row.append(_fmt(*hit[["mean", "lo", "hi"]].iloc[0], ci=True) if len(hit) else "")
            if paper is not None:
                p = paper[(paper.method == method) & (paper.nfe == n)]
                row.append(f"{p.fid.iloc[0]:.2f}" if len(p) else "")
        rows.append(row)
    return header, rows


def _markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "{": r"\{",
                  "}": r"\}", "$": r"\$", "^": r"\^{}", "~": r"\~{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _latex_table(header, rows, caption: str) -> str:
    spec = "l" + "r" * (len(header) - 1)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for i, r in enumerate(rows):
        out.append(" & ".join(_latex_escape(x) for x in r) + r" \\")
        if i == 0 and r[0] == REFERENCE_METHOD:
            out.append(r"\midrule")
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(out)


def _footer(df: pd.DataFrame, dataset: str, published: pd.DataFrame | None) -> str:
    sub = df[df.dataset == dataset]
    first = sub.iloc[0]
    seeds = sorted(int(s) for s in sub.seed.unique())
    parts = [f"metric family: {first.protocol_metric_family}", f"N = {int(first.n_samples)} samples per cell",
             f"sample seed {int(first.sample_seed)} (per-image seeds)", f"{first.weights.upper()} weights",
             f"training seeds {seeds}: mean [{CONFIDENCE:.0%} percentile-bootstrap CI of the mean over seeds]"]
    for key in sorted(k for k in sub.columns if k.startswith("protocol_") and k != "protocol_metric_family"):
        values = sorted({str(v) for v in sub[key].dropna().unique()})
        if values:
            parts.append(f"{key.removeprefix('protocol_').replace('_', ' ')}: {'; '.join(values)}")
    floor = sub[sub.metric.str.endswith("_real")]
    for metric, group in floor.groupby("metric"):
        parts.append(f"real-vs-real {metric.removesuffix('_real')} (real images as the samples, sets as stated): "
                     f"{group.value.iloc[0]:.3g}")
    ent = sub[sub.metric == "entropy"]
    if len(ent):
        parts.append(f"true mixture entropy {ent.value.iloc[0]:.4f} nats (the NLL floor)")
    if _published(published, dataset) is not None:
        parts.append("paper: published FID as quoted in config/published_fid.csv (each paper's own protocol)")
    return "Protocol: " + "; ".join(parts) + "."


def _shown(df: pd.DataFrame, dataset: str) -> list[str]:
    present = set(df[df.dataset == dataset].metric)
    return [m for m in SHOWN[_kind(df, dataset)] if m in present]


def _label(df: pd.DataFrame, dataset: str, metric: str) -> str:
    label = LABELS[metric] + (f"({dataset})" if metric.endswith("_cnn") else "")
    if metric.startswith("fid_") and "protocol_inception_label" in df:  # rows from default_1 weights say so
        weights = set(df.loc[df.dataset == dataset, "protocol_inception_label"].dropna())
        if any("default_1" in w for w in weights):
            label = label.removesuffix(")") + "; default_1 weights)"
    return label


def compute_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, seed, nfe): what the row cost to train and to sample."""
    cols = ["dataset", "method", "seed", "nfe", *[c for c in COMPUTE_COLUMNS if c != "nfe"]]
    return df[cols].drop_duplicates(["dataset", "method", "seed", "nfe"]).reset_index(drop=True)


def _compute_markdown(comp: pd.DataFrame, dataset: str) -> str:
    sub = comp[comp.dataset == dataset]
    if sub.params.isna().all():
        return ""
    header = ["method", "params", "train GFLOP/iter", "iterations", "train PFLOP total", "s/iter",
              "sampling GFLOP/sample by NFE", "ms/sample by NFE"]
    rows = []
    for method in _method_order(sub.method.unique()):
        m = sub[sub.method == method]
        per_nfe = m.groupby("nfe")[["flops_per_sample", "sec_per_sample"]].mean()
        rows.append([method, f"{int(m.params.iloc[0]):,}", f"{m.train_flops_per_iter.mean() / 1e9:.3g}",
                     f"{int(m.iterations.iloc[0])}", f"{m.train_flops_total.mean() / 1e15:.3g}",
                     f"{m.sec_per_iter.mean():.3g}",
                     ", ".join(f"{n}: {v / 1e9:.3g}" for n, v in per_nfe.flops_per_sample.items()),
                     ", ".join(f"{n}: {v * 1e3:.3g}" for n, v in per_nfe.sec_per_sample.items())])
    devices = "; ".join(sorted({str(d) for d in sub.train_device.dropna().unique()}))
    return (_markdown_table(header, rows) + f"\n\nFLOPs counted by torch.utils.flop_counter on the real calls (a "
            f"JVP counts; a distillation method's teacher calls are in its iterations, the teacher's own training "
            f"is its row); times on {devices}. Effective sampling compute as in the sCM paper = params x NFE "
            f"(results.csv column params_x_nfe).")


def reports(df: pd.DataFrame, published: pd.DataFrame | None = None) -> tuple[str, str]:
    """(Markdown, LaTeX) of every dataset's tables."""
    md = ["# cmbench summary", "",
          "Lower is better everywhere. Rows: methods (the diffusion teacher is the reference); columns: network "
          "evaluations per sample (NFE); cells: mean over training seeds [95% bootstrap CI].", ""]
    tex = [r"% cmbench summary: \usepackage{booktabs}"]
    comp = compute_table(df)
    for dataset in sorted(df.dataset.unique()):
        footer = _footer(df, dataset, published)
        for metric in _shown(df, dataset):
            header, rows = _grid(df, dataset, metric, published)
            title = f"{dataset}: {_label(df, dataset, metric)}"
            md += [f"## {title}", "", _markdown_table(header, rows), ""]
            tex += ["", _latex_table(header, rows, f"{title}. {footer}")]
        md += [footer, ""]
        compute_md = _compute_markdown(comp, dataset)
        if compute_md:
            md += [f"## {dataset}: compute", "", compute_md, ""]
    return "\n".join(md), "\n".join(tex) + "\n"


def dvc_metrics(df: pd.DataFrame) -> dict:
    """{dataset: {metric: {method: {"nfe<k>": mean}}}}: what `dvc metrics show/diff` prints."""
    out: dict = {}
    for dataset in sorted(df.dataset.unique()):
        metric = PRIMARY[_kind(df, dataset)]
        wide = table(df, dataset, metric)
        out[dataset] = {metric: {m: {f"nfe{int(n)}": round(float(v), 6) for n, v in row.dropna().items()}
                                 for m, row in wide.iterrows()}}
    return out


def _primary_rows(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for dataset in sorted(df.dataset.unique()):
        metric = PRIMARY[_kind(df, dataset)]
        sub = df[(df.dataset == dataset) & (df.metric == metric)].copy()
        sub["panel"] = f"{dataset}: {_label(df, dataset, metric)}"
        rows.append(sub)
    return pd.concat(rows)


def _plot(data: pd.DataFrame, x: str, xlabel: str, path: Path, **kwargs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = sns.relplot(data=data, x=x, y="value", hue="method", hue_order=_method_order(data.method.unique()),
                       col="panel", facet_kws={"sharey": False, "sharex": False}, height=3.2, aspect=1.2, **kwargs)
    grid.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="value (lower is better)")
    grid.set_titles("{col_name}")
    grid.savefig(path, dpi=120)
    plt.close(grid.figure)


def write_summary(metrics_files: list[str | Path], out_dir: str | Path,
                  published: str | Path | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = tidy(metrics_files)
    pub = pd.read_csv(published, comment="#") if published else None
    paths = {n: out_dir / n for n in SUMMARY_NAMES}
    atomic_write_text(paths["results.csv"], df.to_csv(index=False))
    atomic_write_text(paths["compute.csv"], compute_table(df).to_csv(index=False))
    md, tex = reports(df, pub)
    atomic_write_text(paths["table.md"], md)
    atomic_write_text(paths["table.tex"], tex)
    atomic_write_text(paths["metrics.json"], json.dumps(dvc_metrics(df), indent=2, sort_keys=True) + "\n")
    primary = _primary_rows(df)
    _plot(primary, "nfe", "NFE", paths["quality_vs_nfe.png"], kind="line", marker="o", errorbar=("ci", 95))
    atomic_write_text(paths["quality_vs_nfe.csv"],
                      primary[["dataset", "method", "seed", "nfe", "metric", "value"]].to_csv(index=False))
    if primary.flops_per_sample.notna().all():
        _plot(primary, "flops_per_sample", "sampling FLOPs per sample", paths["quality_vs_sampling_compute.png"],
              kind="line", marker="o", errorbar=("ci", 95))
        _plot(primary, "train_flops_total", "training FLOPs (this method's own run)",
              paths["quality_vs_training_compute.png"], kind="scatter", style="nfe", s=60)
    else:  # rows from before compute accounting: say so instead of drawing an empty axis
        for name in ("quality_vs_sampling_compute.png", "quality_vs_training_compute.png"):
            _placeholder(paths[name], "no compute columns in these metrics files (rerun `cmbench sample`)")
    return list(paths.values())


def _placeholder(path: Path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    fig.savefig(path)
    plt.close(fig)

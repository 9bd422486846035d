"""Metrics files -> results/summary: a tidy CSV, Table-1-shaped Markdown, a DVC metrics file and a plot.

The tidy CSV has one row per (dataset, method, seed, NFE, metric) with the protocol fields beside the value,
so any table can be rebuilt from it.  The Markdown table follows the papers' Table 1: methods as rows, NFE
as columns, the teacher as the reference row, and a footer that states the protocol.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .fsutil import atomic_write_text

# The headline metric per dataset kind (lower is better for all of them), and the secondary ones shown too.
PRIMARY = {"gmm": "energy_distance", "image": "fd_cnn"}
SHOWN = {"gmm": ["energy_distance", "nll", "flow_map_error_mean"], "image": ["fd_cnn", "kid_cnn"]}
LABELS = {
    "energy_distance": "energy distance to the true mixture",
    "nll": "NLL under the true mixture (nats)",
    "flow_map_error_mean": "mean error vs the exact flow map Phi_{80->0}",
    "fd_cnn": "FD-CNN",
    "kid_cnn": "KID-CNN",
}
REFERENCE_METHOD = "teacher"
# Rows in the order of the papers' lineage (CM -> iCT -> ECT -> CTM -> sCM -> FACM); others follow alphabetically.
METHOD_ORDER = ["teacher", "cd", "ct", "ict", "ect", "ctm", "sct", "scd", "facm"]


def tidy(metrics_files: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in metrics_files:
        m = json.loads(Path(path).read_text())
        base = {k: m[k] for k in ("dataset", "method", "seed", "steps", "nfe", "sample_seed", "n_samples", "weights")}
        base.update({f"protocol_{k}": v for k, v in m["protocol"].items() if k != "n_samples"})
        for name, value in m["metrics"].items():
            rows.append({**base, "metric": name, "value": float(value)})
    if not rows:
        raise ValueError("no metrics files given to report")
    df = pd.DataFrame(rows)
    return df.sort_values(["dataset", "method", "seed", "nfe", "metric"], kind="stable").reset_index(drop=True)


def _kind(df: pd.DataFrame, dataset: str) -> str:
    family = df.loc[df.dataset == dataset, "protocol_metric_family"].iloc[0]
    return "gmm" if family.startswith("exact") else "image"


def _method_order(methods) -> list[str]:
    known = [m for m in METHOD_ORDER if m in set(methods)]
    return known + sorted(set(methods) - set(METHOD_ORDER))


def table(df: pd.DataFrame, dataset: str, metric: str) -> pd.DataFrame:
    """Methods x NFE, mean over training seeds."""
    sub = df[(df.dataset == dataset) & (df.metric == metric)]
    wide = sub.groupby(["method", "nfe"])["value"].mean().unstack("nfe")
    return wide.reindex(_method_order(wide.index))


def _markdown(wide: pd.DataFrame) -> str:
    cols = list(wide.columns)
    lines = ["| method | " + " | ".join(f"NFE {c}" for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for method, row in wide.iterrows():
        cells = ["" if pd.isna(v) else f"{v:.4g}" for v in row.tolist()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _footer(df: pd.DataFrame, dataset: str) -> str:
    sub = df[df.dataset == dataset]
    first = sub.iloc[0]
    seeds = sorted(int(s) for s in sub.seed.unique())
    parts = [f"metric family: {first.protocol_metric_family}", f"N = {int(first.n_samples)} samples per cell",
             f"sample seed {int(first.sample_seed)} (per-image seeds)", f"{first.weights.upper()} weights",
             f"training seeds {seeds} (mean shown)"]
    for key in ("protocol_library", "protocol_reference"):
        if key in sub and isinstance(first.get(key), str):
            parts.append(first[key])
    floor = sub[sub.metric == "energy_distance_real"]
    if len(floor):
        parts.append(f"true-vs-true energy distance at the same N: {floor.value.iloc[0]:.2g}")
    ent = sub[sub.metric == "entropy"]
    if len(ent):
        parts.append(f"true mixture entropy {ent.value.iloc[0]:.4f} nats (the NLL floor)")
    return "Protocol: " + "; ".join(parts) + "."


def markdown_report(df: pd.DataFrame) -> str:
    out = ["# cmbench summary", "",
           "Lower is better everywhere. Rows: methods (the diffusion teacher is the reference); columns: network "
           "evaluations per sample (NFE).", ""]
    for dataset in sorted(df.dataset.unique()):
        kind = _kind(df, dataset)
        for metric in SHOWN[kind]:
            if metric not in set(df[df.dataset == dataset].metric):
                continue
            label = LABELS[metric] + (f"({dataset})" if kind == "image" else "")
            out += [f"## {dataset}: {label}", "", _markdown(table(df, dataset, metric)), ""]
        out += [_footer(df, dataset), ""]
    return "\n".join(out)


def dvc_metrics(df: pd.DataFrame) -> dict:
    """{dataset: {method: {"nfe<k>": primary metric}}}: what `dvc metrics show/diff` prints."""
    out: dict = {}
    for dataset in sorted(df.dataset.unique()):
        metric = PRIMARY[_kind(df, dataset)]
        wide = table(df, dataset, metric)
        out[dataset] = {metric: {m: {f"nfe{int(n)}": round(float(v), 6) for n, v in row.dropna().items()}
                                 for m, row in wide.iterrows()}}
    return out


def plot_quality_vs_nfe(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    rows = []
    for dataset in sorted(df.dataset.unique()):
        metric = PRIMARY[_kind(df, dataset)]
        sub = df[(df.dataset == dataset) & (df.metric == metric)].copy()
        sub["panel"] = f"{dataset}: {LABELS[metric]}"
        rows.append(sub)
    data = pd.concat(rows)
    grid = sns.relplot(data=data, x="nfe", y="value", hue="method", hue_order=_method_order(data.method.unique()),
                       col="panel", kind="line", marker="o", errorbar=("ci", 95), facet_kws={"sharey": False},
                       height=3.2, aspect=1.2)
    grid.set(xscale="log", yscale="log", xlabel="NFE", ylabel="value (lower is better)")
    grid.set_titles("{col_name}")
    grid.savefig(path, dpi=120)
    return data[["dataset", "method", "seed", "nfe", "metric", "value"]]


def write_summary(metrics_files: list[str | Path], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = tidy(metrics_files)
    paths = [out_dir / n for n in ("results.csv", "table.md", "metrics.json", "quality_vs_nfe.png",
                                   "quality_vs_nfe.csv")]
    atomic_write_text(paths[0], df.to_csv(index=False))
    atomic_write_text(paths[1], markdown_report(df))
    atomic_write_text(paths[2], json.dumps(dvc_metrics(df), indent=2, sort_keys=True) + "\n")
    plot_data = plot_quality_vs_nfe(df, paths[3])
    atomic_write_text(paths[4], plot_data.to_csv(index=False))
    return paths

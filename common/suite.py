"""The mixture suite's table (config/mixtures.yaml, docs/evaluation.md "Held-out mixtures").

Each method's quality is given relative to the teacher of the same mixture, so mixtures of different difficulty
and dimension can share one median: energy distance / the teacher's at its largest NFE (both raised to the
mixture's real-vs-real floor |ED_real|, below which a difference is sampling noise). Development mixtures
(where hyperparameters may be chosen) and held-out mixtures (only reported) are summarized side by side.
"""

from __future__ import annotations

import pandas as pd

SETS = ("development", "held_out")
RELATIVE = "energy_distance"  # the metric made relative to the teacher
ABSOLUTE = ("mode_weight_tv", "off_mode_share")  # already comparable across mixtures: shown as they are
COLUMNS = ["set", "method", "nfe", "metric", "median", "q25", "q75", "n_mixtures"]


def _per_mixture(df: pd.DataFrame) -> pd.DataFrame:
    """One value per (set, dataset, method, nfe, metric): the mean over training seeds, energy distance relative
    to the teacher."""
    mean = (df.groupby(["protocol_mixture_set", "dataset", "method", "nfe", "metric"], as_index=False)["value"]
            .mean().rename(columns={"protocol_mixture_set": "set"}))
    floor = mean[mean.metric == f"{RELATIVE}_real"].groupby("dataset")["value"].apply(lambda v: v.abs().max())
    ed = mean[mean.metric == RELATIVE].copy()
    ed["value"] = ed[["value"]].join(ed.dataset.map(floor).rename("floor")).max(axis=1)
    teacher = ed[ed.method == "teacher"].sort_values("nfe").groupby("dataset")["value"].last()
    ed["value"] = ed.value / ed.dataset.map(teacher)
    ed["metric"] = f"{RELATIVE}_vs_teacher"
    return pd.concat([ed.dropna(subset=["value"]), mean[mean.metric.isin(ABSOLUTE)]], ignore_index=True)


def suite_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median and quartiles over the mixtures of each set, per method, NFE and metric (empty without a suite)."""
    if "protocol_mixture_set" not in df or df.protocol_mixture_set.isna().all():
        return pd.DataFrame(columns=COLUMNS)
    per = _per_mixture(df[df.protocol_mixture_set.notna()])
    grouped = per.groupby(["set", "method", "nfe", "metric"])["value"]
    out = grouped.agg(median="median", q25=lambda v: v.quantile(0.25), q75=lambda v: v.quantile(0.75),
                      n_mixtures="count").reset_index()
    return out[COLUMNS].sort_values(["metric", "method", "nfe", "set"], kind="stable").reset_index(drop=True)


def suite_markdown(table: pd.DataFrame, method_order) -> str:
    """One table per metric: rows (method, NFE), columns development | held-out, cells median [q25, q75]."""
    if table.empty:
        return ""
    titles = {f"{RELATIVE}_vs_teacher": "energy distance / the teacher's at its largest NFE (1 = as good as the "
                                        "teacher; lower is better)",
              "mode_weight_tv": "mode-weight TV (lower is better)",
              "off_mode_share": "off-mode share (a perfect sampler: q)"}
    out = ["## Mixture suite: each method relative to its teacher", "",
           "Median [quartiles] over the mixtures of each set. Hyperparameters may be chosen on the development "
           "mixtures only; the held-out mixtures are reported, never tuned on.", ""]
    for metric, title in titles.items():
        sub = table[table.metric == metric]
        if sub.empty:
            continue
        counts = {s: int(sub[sub.set == s].n_mixtures.max()) for s in SETS if (sub.set == s).any()}
        header = ["method", "NFE"] + [f"{s.replace('_', '-')} (n = {counts[s]})" for s in SETS if s in counts]
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in [m for m in method_order(sub.method.unique())]:
            for nfe in sorted(sub[sub.method == method].nfe.unique()):
                cells = []
                for s in (s for s in SETS if s in counts):
                    row = sub[(sub.method == method) & (sub.nfe == nfe) & (sub.set == s)]
                    cells.append("" if row.empty else
                                 f"{row['median'].iloc[0]:.3g} [{row.q25.iloc[0]:.3g}, {row.q75.iloc[0]:.3g}]")
                lines.append(f"| {method} | {int(nfe)} | " + " | ".join(cells) + " |")
        out += lines + [""]
    return "\n".join(out)

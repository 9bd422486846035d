"""Metrics files -> results/summary: tidy CSV, Table-1-shaped Markdown and LaTeX, DVC metrics and plots.

The tidy CSV has one row per (dataset, method, seed, NFE, metric) with the protocol and the compute columns
beside the value, so any table can be rebuilt from it.  The tables follow the papers' Table 1: methods as rows,
NFE as columns, the teacher as the reference row, each cell the mean over training seeds with a 95% bootstrap
confidence interval, and a footer that states the protocol.  On paper tracks a "paper" column shows the
published number beside ours (config/published_fid.csv): each number carries a lettered footnote with its source
and, where it differs from our run's, its setting (`variant`), and each method whose run departs from its paper's
recipe carries a numbered row note (`note`), so an L2 row never sits unmarked beside an LPIPS number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .fsutil import atomic_write_text
from .records import KIND_METRIC, metrics_kind, read_metrics
from .suite import suite_markdown, suite_table

# The headline metric per dataset kind (lower is better for all of them), and the ones shown in the tables.
PRIMARY = KIND_METRIC  # the metric every metrics file of a dataset kind holds
# gmm shows NLL only as NLL - H: an over-concentrated sampler's NLL falls below the entropy H (docs/evaluation.md)
SHOWN = {"gmm": ["flow_map_error_mean", "nll_gap", "energy_distance", "mode_weight_tv", "off_mode_share"],
         "image": ["fd_cnn", "kid_cnn", "fid_torch_fidelity", "fid_clean_fid"]}
LABELS = {
    "energy_distance": "energy distance to the true mixture",
    "nll_gap": "NLL - H: NLL under the true mixture minus its entropy H (nats; perfect: 0, below 0: over-concentrated)",
    "mode_weight_tv": "mode-weight TV: MAP-component histogram vs true samples' (perfect: the real-vs-real floor)",
    "off_mode_share": "off-mode share: samples below the true samples' q-quantile of log p (perfect: q, below q: "
                      "over-concentrated)",
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
                   "train_device", "flops_budget", "teacher_flops_total"]  # the last two: absent in older records
SUMMARY_NAMES = ["results.csv", "compute.csv", "table.md", "table.tex", "metrics.json", "quality_vs_nfe.png",
                 "quality_vs_nfe.csv", "quality_vs_sampling_compute.png", "quality_vs_training_compute.png",
                 "quality_vs_total_training_compute.png", "suite.csv"]
CONFIDENCE = 0.95
N_BOOTSTRAP = 10_000


def tidy(metrics_files: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in metrics_files:
        m = read_metrics(path)
        base = {k: m[k] for k in ("dataset", "method", "seed", "steps", "nfe", "sample_seed", "n_samples", "weights")}
        base.update({f"protocol_{k}": v for k, v in m["protocol"].items() if k != "n_samples"})
        base.update({k: m.get("compute", {}).get(k) for k in COMPUTE_COLUMNS})
        metrics = m["metrics"]
        if {"nll", "entropy"} <= set(metrics):  # records from before nll_gap get it too
            metrics.setdefault("nll_gap", metrics["nll"] - metrics["entropy"])
        for name, value in metrics.items():
            rows.append({**base, "metric": name, "value": float(value)})
    if not rows:
        raise ValueError("no metrics files given to report")
    df = pd.DataFrame(rows)
    df["total_flops"] = total_flops(df)
    return df.sort_values(["dataset", "method", "seed", "nfe", "metric"], kind="stable").reset_index(drop=True)


def total_flops(df: pd.DataFrame) -> pd.Series:
    """Training FLOPs including the teacher's: the run's own plus those of the teacher run it builds on (its
    weights or its distillation targets; 0 for the teacher and for methods without one).  NaN where a record
    predates teacher_flops_total."""
    return (pd.to_numeric(df.train_flops_total, errors="coerce")
            + pd.to_numeric(df.teacher_flops_total, errors="coerce"))


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


class Cell(NamedTuple):
    """A table cell with a footnote mark (a letter for a paper number's reference, a number for a row note)."""

    text: str
    mark: str = ""


class Notes(NamedTuple):
    """The footnotes of one table: paper references [(letter, text)] and row notes [(number, method, text)]."""

    paper: list[tuple[str, str]]
    rows: list[tuple[str, str, str]]


def _published(published: pd.DataFrame | None, dataset: str) -> pd.DataFrame | None:
    if published is None:
        return None
    sub = published[published.dataset == dataset]
    return sub if len(sub) else None


def _text(value) -> str:
    """A CSV field as text: '' for a missing value."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def _letter(i: int) -> str:
    """a, b, ..., z, aa, ab, ...: the footnote letter of the i-th paper reference."""
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(ord("a") + r) + out
    return out


def row_notes(published: pd.DataFrame | None, dataset: str) -> dict[str, list[str]]:
    """{method: its distinct `note`s, in file order}: the departures of our run from the paper's recipe."""
    sub = _published(published, dataset)
    if sub is None or "note" not in sub:
        return {}
    out: dict[str, list[str]] = {}
    for method, note in zip(sub.method, sub.note, strict=True):
        text = _text(note)
        if text and text not in out.setdefault(method, []):
            out[method].append(text)
    return {m: n for m, n in out.items() if n}


def _paper_reference(row) -> str:
    """'source: variant' (the setting of the published number), or the source alone."""
    source, variant = _text(row.get("source")), _text(row.get("variant"))
    return f"{source}: {variant}" if source and variant else source or variant


def _row_marks(df: pd.DataFrame, dataset: str, published: pd.DataFrame | None) -> list[tuple[str, str, str]]:
    """[(number, method, note)] for the dataset's methods that have row notes, numbered in table order (the same
    numbers in every table of the dataset)."""
    notes = row_notes(published, dataset)
    methods = [m for m in _method_order(df.loc[df.dataset == dataset, "method"].unique()) if m in notes]
    return [(str(i), m, "; ".join(notes[m])) for i, m in enumerate(methods, start=1)]


def _grid(df: pd.DataFrame, dataset: str, metric: str, published: pd.DataFrame | None):
    """Header, rows and footnotes of one table: methods x NFE (x ours/paper on paper tracks)."""
    c = cells(df, dataset, metric)
    nfes = sorted(c.nfe.unique())
    paper = _published(published, dataset) if metric == PAPER_METRIC else None
    if paper is not None:
        paper = paper[paper.fid.notna() & paper.nfe.notna()]  # rows that carry only a note have no number
    marks = {method: (n, method, text) for n, method, text in _row_marks(df, dataset, published)}
    header = ["method"]
    for n in nfes:
        header += [f"NFE {n}"] if paper is None else [f"NFE {n} ours", f"NFE {n} paper"]
    rows, refs, row_notes_here = [], {}, []
    for method in _method_order(c.method.unique()):
        if method in marks:
            row_notes_here.append(marks[method])
        row = [Cell(method, marks[method][0] if method in marks else "")]
        for n in nfes:
            hit = c[(c.method == method) & (c.nfe == n)]
            row.append(Cell(_fmt(*hit[["mean", "lo", "hi"]].iloc[0], ci=True) if len(hit) else ""))
            if paper is not None:
                p = paper[(paper.method == method) & (paper.nfe == n)]
                if len(p):
                    ref = _paper_reference(p.iloc[0])
                    letter = refs.setdefault(ref, _letter(len(refs))) if ref else ""
                    row.append(Cell(f"{p.fid.iloc[0]:.2f}", letter))
                else:
                    row.append(Cell(""))
        rows.append(row)
    return header, rows, Notes([(letter, ref) for ref, letter in refs.items()], row_notes_here)


def _fmt_md(cell) -> str:
    cell = cell if isinstance(cell, Cell) else Cell(str(cell))
    return cell.text + (f"<sup>{cell.mark}</sup>" if cell.mark else "")


def _markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(_fmt_md(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown_paper_notes(notes: Notes) -> str:
    """The lettered references of the paper column (under its table)."""
    if not notes.paper:
        return ""
    return "\n".join(["Paper numbers (config/published_fid.csv; source: setting where it differs from ours):", "",
                      *[f"- <sup>{letter}</sup> {text}" for letter, text in notes.paper]])


def _markdown_row_notes(marks: list[tuple[str, str, str]]) -> str:
    """The numbered row notes: where our runs depart from their papers' recipes (once per dataset)."""
    if not marks:
        return ""
    return "\n".join(["Row notes: where our runs depart from their paper's recipe (config/published_fid.csv, "
                      "docs/methods.md):", "", *[f"- <sup>{n}</sup> {method}: {text}" for n, method, text in marks]])


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "{": r"\{",
                  "}": r"\}", "$": r"\$", "^": r"\^{}", "~": r"\~{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _fmt_tex(cell) -> str:
    cell = cell if isinstance(cell, Cell) else Cell(str(cell))
    return _latex_escape(cell.text) + (rf"\textsuperscript{{{_latex_escape(cell.mark)}}}" if cell.mark else "")


def _latex_table(header, rows, caption: str, notes: Notes | None = None) -> str:
    spec = "l" + "r" * (len(header) - 1)
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for i, r in enumerate(rows):
        out.append(" & ".join(_fmt_tex(x) for x in r) + r" \\")
        if i == 0 and _cell_text(r[0]) == REFERENCE_METHOD:
            out.append(r"\midrule")
    out += [r"\bottomrule", r"\end{tabular}"]
    lines = [] if notes is None else (
        [rf"\textsuperscript{{{_latex_escape(m)}}} {_latex_escape(t)}" for m, t in notes.paper]
        + [rf"\textsuperscript{{{n}}} {_latex_escape(method)}: {_latex_escape(t)}" for n, method, t in notes.rows])
    if lines:  # footnotes under the tabular: paper references (letters), then row notes (numbers)
        out += [r"\par\smallskip", r"\begin{minipage}{\linewidth}\footnotesize\raggedright",
                *[line + (r" \\" if i < len(lines) - 1 else "") for i, line in enumerate(lines)], r"\end{minipage}"]
    out += [rf"\caption{{{_latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(out)


def _cell_text(cell) -> str:
    return cell.text if isinstance(cell, Cell) else str(cell)


def _flops(value: float) -> str:
    """4 significant digits, exponent without sign or padding: 4.305e12."""
    mantissa, _, exponent = f"{value:.4g}".partition("e")
    return mantissa + (f"e{int(exponent)}" if exponent else "")


def training_mode(sub: pd.DataFrame) -> str:
    """Which mode trained these rows (train.flops_budget, docs/evaluation.md): equal iterations or equal compute,
    naming the methods that kept their configured iterations (the teacher, in the shipped equal_compute budgets)."""
    runs = sub.drop_duplicates(["method", "seed"])
    budget = pd.to_numeric(runs["flops_budget"], errors="coerce") if "flops_budget" in runs else None
    if budget is None or budget.isna().all():
        return "equal iterations (per-method budgets from the config)"
    values = sorted(set(budget.dropna()))
    text = (f"equal compute: {_flops(values[0])} FLOPs of training per method" if len(values) == 1 else
            f"unequal FLOPs budgets: {', '.join(_flops(v) for v in values)} FLOPs of training")
    others = _method_order(set(runs.method[budget.isna()]))
    return text + (f" ({', '.join(others)}: the configured iterations)" if others else "")


def _footer(df: pd.DataFrame, dataset: str, published: pd.DataFrame | None) -> str:
    sub = df[df.dataset == dataset]
    first = sub.iloc[0]
    seeds = sorted(int(s) for s in sub.seed.unique())
    parts = [f"metric family: {first.protocol_metric_family}", f"N = {int(first.n_samples)} samples per cell",
             f"sample seed {int(first.sample_seed)} (per-image seeds)", f"{first.weights.upper()} weights",
             f"training seeds {seeds}: mean [{CONFIDENCE:.0%} percentile-bootstrap CI of the mean over seeds]",
             f"training mode: {training_mode(sub)}"]
    for key in sorted(k for k in sub.columns if k.startswith("protocol_") and k != "protocol_metric_family"):
        values = sorted({str(v) for v in sub[key].dropna().unique()})
        if values:
            parts.append(f"{key.removeprefix('protocol_').replace('_', ' ')}: {'; '.join(values)}")
    floor = sub[sub.metric.str.endswith("_real")]
    for metric, group in floor.groupby("metric"):
        parts.append(f"real-vs-real {metric.removesuffix('_real')} (real images as the samples, sets as stated): "
                     f"{group.value.iloc[0]:.3g}")
    ent, ent_se = sub[sub.metric == "entropy"], sub[sub.metric == "entropy_se"]
    if len(ent):  # a perfect sampler's NLL, not a floor: an over-concentrated sampler goes below it
        se = f" +- {ent_se.value.iloc[0]:.1g}" if len(ent_se) else ""
        parts.append(f"true mixture entropy H = {ent.value.iloc[0]:.4f}{se} nats (Monte Carlo; a perfect sampler's "
                     f"NLL)")
    if _published(published, dataset) is not None:
        parts.append("paper: published FID as quoted in config/published_fid.csv (each paper's own protocol; "
                     "letters: its source and setting; numbers: row notes)")
    return "Protocol: " + "; ".join(parts) + "."


def _shown(df: pd.DataFrame, dataset: str) -> list[str]:
    present = set(df[df.dataset == dataset].metric)
    return [m for m in SHOWN[_kind(df, dataset)] if m in present]


def _label(df: pd.DataFrame, dataset: str, metric: str) -> str:
    label = LABELS[metric] + (f"({dataset})" if metric.endswith("_cnn") else "")
    sub = df[df.dataset == dataset]
    if metric == "nll_gap" and (sub.metric == "entropy").any():  # H beside the gap: NLL is never shown alone
        label = label.removesuffix(")") + f"; H = {sub.value[sub.metric == 'entropy'].iloc[0]:.4f})"
    if metric == "off_mode_share" and "protocol_off_mode_quantile" in sub:
        q = sorted(set(sub.protocol_off_mode_quantile.dropna()))
        label = label.removesuffix(")") + (f"; q = {', '.join(f'{v:g}' for v in q)})" if q else ")")
    if metric.startswith("fid_") and "protocol_inception_label" in df:  # rows from default_1 weights say so
        weights = set(df.loc[df.dataset == dataset, "protocol_inception_label"].dropna())
        if any("default_1" in w for w in weights):
            label = label.removesuffix(")") + "; default_1 weights)"
    return label


def compute_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, seed, nfe): what the row cost to train and to sample."""
    cols = ["dataset", "method", "seed", "nfe", *[c for c in COMPUTE_COLUMNS if c != "nfe"]]
    out = df[cols].drop_duplicates(["dataset", "method", "seed", "nfe"]).reset_index(drop=True)
    out["total_flops"] = total_flops(out)  # the run's training plus its teacher's (docs/evaluation.md)
    return out


def _compute_markdown(comp: pd.DataFrame, dataset: str) -> str:
    sub = comp[comp.dataset == dataset]
    if sub.params.isna().all():
        return ""
    header = ["method", "params", "train GFLOP/iter", "iterations", "train PFLOP total",
              "total PFLOP incl. teacher", "s/iter", "sampling GFLOP/sample by NFE", "ms/sample by NFE"]
    rows = []
    for method in _method_order(sub.method.unique()):
        m = sub[sub.method == method]
        per_nfe = m.groupby("nfe")[["flops_per_sample", "sec_per_sample"]].mean()
        rows.append([method, f"{int(m.params.iloc[0]):,}", f"{m.train_flops_per_iter.mean() / 1e9:.3g}",
                     f"{int(m.iterations.iloc[0])}", f"{m.train_flops_total.mean() / 1e15:.3g}",
                     "" if m.total_flops.isna().any() else f"{m.total_flops.mean() / 1e15:.3g}",
                     f"{m.sec_per_iter.mean():.3g}",
                     ", ".join(f"{n}: {v / 1e9:.3g}" for n, v in per_nfe.flops_per_sample.items()),
                     ", ".join(f"{n}: {v * 1e3:.3g}" for n, v in per_nfe.sec_per_sample.items())])
    devices = "; ".join(sorted({str(d) for d in sub.train_device.dropna().unique()}))
    return (_markdown_table(header, rows) + f"\n\nFLOPs counted by torch.utils.flop_counter on the real calls (a "
            f"JVP counts; a distillation method's teacher calls are in its iterations, the teacher's own training "
            f"is its row and is added in the total of each method that starts from or distills the trained teacher; "
            f"empty: a run from before this accounting); times on {devices}. Effective sampling compute as in the "
            f"sCM paper = params x NFE (results.csv column params_x_nfe). Training mode: {training_mode(sub)}.")


def reports(df: pd.DataFrame, published: pd.DataFrame | None = None) -> tuple[str, str]:
    """(Markdown, LaTeX) of every dataset's tables."""
    md = ["# cmbench summary", "",
          "Lower is better, except where a title gives a perfect sampler's value (NLL - H: 0; off-mode share: q): "
          "there a departure either way is worse. Rows: methods (the diffusion teacher is the reference); columns: "
          "network evaluations per sample (NFE); cells: mean over training seeds [95% bootstrap CI].", ""]
    tex = [r"% cmbench summary: \usepackage{booktabs}"]
    comp = compute_table(df)
    for dataset in sorted(df.dataset.unique()):
        footer = _footer(df, dataset, published)
        for metric in _shown(df, dataset):
            header, rows, notes = _grid(df, dataset, metric, published)
            title = f"{dataset}: {_label(df, dataset, metric)}"
            md += [f"## {title}", "", _markdown_table(header, rows), ""]
            paper_md = _markdown_paper_notes(notes)
            if paper_md:
                md += [paper_md, ""]
            tex += ["", _latex_table(header, rows, f"{title}. {footer}", notes)]
        row_notes_md = _markdown_row_notes(_row_marks(df, dataset, published))
        if row_notes_md:  # the same runs in every table of the dataset: their notes once, before the protocol
            md += [row_notes_md, ""]
        md += [footer, ""]
        compute_md = _compute_markdown(comp, dataset)
        if compute_md:
            md += [f"## {dataset}: compute", "", compute_md, ""]
    suite_md = suite_markdown(suite_table(df), _method_order)
    if suite_md:
        md += [suite_md]
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
    atomic_write_text(paths["suite.csv"], suite_table(df).to_csv(index=False))
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
    total = primary.dropna(subset=["total_flops"])  # rows of runs trained before teacher_flops_total: left out
    if len(total):
        _plot(total, "total_flops", "training FLOPs including the teacher's training",
              paths["quality_vs_total_training_compute.png"], kind="scatter", style="nfe", s=60)
    else:
        _placeholder(paths["quality_vs_total_training_compute.png"],
                     "no teacher_flops_total in these metrics files (runs trained before total-cost accounting)")
    return list(paths.values())


def _placeholder(path: Path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    fig.savefig(path)
    plt.close(fig)

"""The report: paper-style tables, figures, and reproduced numbers beside the published ones.

Reads what ``mambapath evaluate`` wrote under ``results/<cohort>/eval/`` and writes, under
``results/<cohort>/report/``:

- ``tables/main.{csv,md,tex}``: methods x (task, cohort) with each task's headline metric as
  mean +/- std over folds, the layout of the papers' tables (the best value in bold);
  ``tables/<task>.{csv,md,tex}``: every metric of one task; ``tables/long.csv``: all numbers
  (mean, std, bootstrap interval, folds); ``tables/comparisons.{csv,md}``: paired fold-wise tests
  against the best method; ``tables/published.{csv,md}``: reproduced beside published numbers.
- ``figures/folds_<cohort>_<task>.{png,pdf}``: the headline metric per fold per method;
  ``figures/km_<cohort>_<task>[_<method>].{png,pdf}``: Kaplan-Meier curves of the high- and
  low-risk halves (median split of predicted risk) with the log-rank p-value.
- ``index.md`` and ``index.html``: one page with all of it.

Our method names map to the papers' names in :data:`PAPER_METHOD_NAMES` (the one place
where that mapping lives); feature extractors map to the papers' backbone names in
:data:`EXTRACTOR_BACKBONES`.
"""

from __future__ import annotations

import argparse
import html
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import metrics as M
from .errors import DataError
from .io import atomic_path, read_json, write_csv, write_text

log = logging.getLogger(__name__)

PUBLISHED_DIR = Path(__file__).resolve().parent / "data" / "published"

#: our method name (config/methods/<name>.yaml) -> the name the papers' tables use; a variant
#: carries its setting in parentheses and is set beside the published rows of its base name
PAPER_METHOD_NAMES: dict[str, str] = {
    "mean_mil": "MeanMIL",
    "max_mil": "MaxMIL",
    "abmil": "ABMIL",
    "transmil": "TransMIL",
    "ilra_mil": "ILRA-MIL",
    "mamba_mil": "MambaMIL",
    "srmamba_mil": "MambaMIL (SRMamba)",
    "bimamba_mil": "MambaMIL (BiMamba)",
    "mamba2d_mil": "2DMambaMIL",
    "pixel_mamba": "Pixel-Mamba",
    "mambaback": "MambaBack",
    "mambaback-raster": "MambaBack (raster)",
    "mambaback-snake": "MambaBack (snake)",
    "mambaback-column": "MambaBack (column)",
    "mambaback-hilbert": "MambaBack (hilbert)",
}

#: our feature extractor -> the backbone column of the published tables
EXTRACTOR_BACKBONES: dict[str, str] = {
    "resnet50_trunc": "ResNet-50",
    "resnet50": "ResNet-50",
    "gigapath": "ViT-G",
    "conch": "ViT-B",
    "uni": "UNI",
}

METRIC_LABELS = {"macro_f1": "macro-F1", "f1": "F1", "accuracy": "accuracy", "auc": "AUC", "c_index": "C-index"}


def paper_name(method: str) -> str:
    return PAPER_METHOD_NAMES.get(method, method)


def paper_base_name(name: str) -> str:
    """A paper's method name without its setting: 'Pixel-Mamba (2.5x)' -> 'Pixel-Mamba'."""
    return re.sub(r"\s*\([^)]*\)\s*$", "", str(name))


def canonical_cohort(name: str) -> str:
    """Cohort names compare without a TCGA prefix and case: tcga_blca = BLCA = TCGA-BLCA."""
    text = str(name).strip().upper().replace("_", "-")
    return re.sub(r"^TCGA-", "", text)


# ----------------------------------------------------------------------------------------------
# Loading evaluation outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class CohortResults:
    name: str
    eval_dir: Path
    tasks: list[str]
    methods: list[str]
    summaries: dict[tuple[str, str], dict] = field(default_factory=dict)
    folds: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    oof: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    comparisons: dict[str, pd.DataFrame] = field(default_factory=dict)

    def task_type(self, task: str) -> str:
        return next(s["task_type"] for (t, _), s in self.summaries.items() if t == task)

    def primary_metric(self, task: str) -> str:
        return next(s["primary_metric"] for (t, _), s in self.summaries.items() if t == task)


def load_cohort_results(
    name: str, eval_dir: str | Path, tasks: Sequence[str] | None = None, methods: Sequence[str] | None = None
) -> CohortResults:
    """Summaries, per-fold tables, pooled predictions and comparisons of one cohort."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise DataError(f"{eval_dir}: no evaluation folder; run `mambapath evaluate` (or snakemake) first")
    if not tasks:
        tasks = sorted(p.name for p in eval_dir.iterdir() if p.is_dir())
    if not methods:
        methods = sorted({p.parent.name for t in tasks for p in (eval_dir / t).glob("*/summary.json")})
    if not tasks or not methods:
        raise DataError(f"{eval_dir}: no summary.json found under <task>/<method>/")
    results = CohortResults(name, eval_dir, list(tasks), list(methods))
    for task in tasks:
        for method in methods:
            folder = eval_dir / task / method
            for file_name in ("summary.json", "folds.csv", "oof.csv"):
                if not (folder / file_name).exists():
                    raise DataError(f"{folder / file_name}: missing; run `mambapath evaluate method` for {task}/{method}")
            results.summaries[(task, method)] = read_json(folder / "summary.json")
            results.folds[(task, method)] = pd.read_csv(folder / "folds.csv")
            results.oof[(task, method)] = pd.read_csv(folder / "oof.csv", dtype={"patient_id": str})
        comparisons = eval_dir / task / "comparisons.csv"
        if comparisons.exists():
            results.comparisons[task] = pd.read_csv(comparisons)
        else:
            log.warning("%s: missing; the report has no paired comparisons for task %s", comparisons, task)
    return results


def long_table(cohorts: Sequence[CohortResults]) -> pd.DataFrame:
    """One row per cohort, task, method and metric with every number the tables show."""
    rows = []
    for c in cohorts:
        for (task, method), s in c.summaries.items():
            for metric, m in s["metrics"].items():
                rows.append({
                    "cohort": c.name,
                    "task": task,
                    "task_type": s["task_type"],
                    "method": method,
                    "paper_method": paper_name(method),
                    "metric": metric,
                    "primary": metric == s["primary_metric"],
                    "mean": m["mean"],
                    "std": m["std"],
                    "ci_low": m.get("ci_low", np.nan),
                    "ci_high": m.get("ci_high", np.nan),
                    "n_folds": m["n_folds"],
                    "fold_values": " ".join(f"{v:.4f}" for v in m["values"]),
                    "level": s["level"],
                    "n_test": s["n_test"],
                    "logrank_p": s.get("km", {}).get("logrank_p", np.nan) if metric == "c_index" else np.nan,
                })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Tables in the papers' layout
# ----------------------------------------------------------------------------------------------


def fmt(mean: float, std: float, digits: int = 4) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


@dataclass
class WideTable:
    """Rows = methods; columns = (group, cohort); cells 'mean ± std'; ``best`` marks column maxima."""

    methods: list[str]
    columns: list[tuple[str, str]]
    cells: pd.DataFrame
    best: pd.DataFrame

    def flat_columns(self) -> list[str]:
        return [f"{group} | {cohort}" for group, cohort in self.columns]


def wide_table(long: pd.DataFrame, groups: Sequence[tuple[str, str]], cohorts: Sequence[str],
               methods: Sequence[str]) -> WideTable:
    """``groups``: (task, metric) pairs, in column order."""
    columns, cells, best = [], {}, {}
    for task, metric in groups:
        label = f"{task} ({METRIC_LABELS.get(metric, metric)})"
        for cohort in cohorts:
            part = long[(long.cohort == cohort) & (long.task == task) & (long.metric == metric)].set_index("method")
            if part.empty:
                continue
            col = (label, cohort)
            columns.append(col)
            means = part["mean"].reindex(methods)
            cells[col] = [fmt(part.loc[m, "mean"], part.loc[m, "std"]) if m in part.index else "" for m in methods]
            top = np.nanmax(means.to_numpy(dtype=float)) if means.notna().any() else np.nan
            best[col] = [bool(np.isfinite(v) and v == top) for v in means.to_numpy(dtype=float)]
    index = [paper_name(m) for m in methods]
    return WideTable(list(methods), columns, pd.DataFrame(cells, index=index), pd.DataFrame(best, index=index))


def table_csv(table: WideTable) -> pd.DataFrame:
    frame = table.cells.copy()
    frame.columns = table.flat_columns()
    frame.insert(0, "method", table.methods)
    frame.insert(0, "Method", table.cells.index)
    return frame


def table_markdown(table: WideTable) -> str:
    cells = table.cells.copy()
    for col in table.columns:
        cells[col] = [f"**{v}**" if b else v for v, b in zip(cells[col], table.best[col])]
    cells.columns = [f"{g}<br>{c}" for g, c in table.columns]
    return cells.rename_axis("Method").reset_index().to_markdown(index=False) + "\n"


def latex_escape(text: str) -> str:
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "±": r"$\pm$", "−": "-"}
    return "".join(replacements.get(ch, ch) for ch in str(text))


def table_latex(table: WideTable, caption: str) -> str:
    """A booktabs tabular: a header row of groups spanning their cohorts, then the cohorts."""
    groups: list[tuple[str, int]] = []
    for group, _ in table.columns:
        if groups and groups[-1][0] == group:
            groups[-1] = (group, groups[-1][1] + 1)
        else:
            groups.append((group, 1))
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
        r"\toprule",
        "Method & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{latex_escape(g)}}}" for g, n in groups) + r" \\",
    ]
    start = 2
    rules = []
    for _, n in groups:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    lines.append(" ".join(rules))
    lines.append(" & " + " & ".join(latex_escape(c) for _, c in table.columns) + r" \\")
    lines.append(r"\midrule")
    for method in table.cells.index:
        row = []
        for col in table.columns:
            value = latex_escape(table.cells.loc[method, col])
            row.append(rf"\textbf{{{value}}}" if table.best.loc[method, col] and value else value)
        lines.append(latex_escape(method) + " & " + " & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def write_table(out_dir: Path, stem: str, table: WideTable, caption: str) -> list[Path]:
    paths = [out_dir / f"{stem}.csv", out_dir / f"{stem}.md", out_dir / f"{stem}.tex"]
    write_csv(paths[0], table_csv(table))
    write_text(paths[1], table_markdown(table))
    write_text(paths[2], table_latex(table, caption))
    return paths


# ----------------------------------------------------------------------------------------------
# Published numbers
# ----------------------------------------------------------------------------------------------


def load_published(folder: Path = PUBLISHED_DIR) -> pd.DataFrame:
    """The published rows that a reproduced table can match, in one long layout.

    Columns: source, method (the paper's name, setting in parentheses split off), setting,
    backbone, task, cohort, metric, mean, std.
    """
    frames = []
    table2 = pd.read_csv(folder / "pixel_mamba_table2.csv", comment="#")
    split = table2["method"].str.extract(r"^(?P<base>.*?)\s*(?:\((?P<setting>[^)]*)\))?$")
    frames.append(pd.DataFrame({
        "source": "Pixel-Mamba, Table 2",
        "method": split["base"],
        "setting": split["setting"].fillna(table2["group"]),
        "backbone": table2["backbone"],
        "task": table2["task"],
        "cohort": table2["cohort"],
        "metric": table2["metric"],
        "mean": table2["mean"].astype(float),
        "std": table2["std"].astype(float),
    }))
    twod = pd.read_csv(folder / "twodmamba_results.csv", comment="#")
    frames.append(pd.DataFrame({
        "source": "2DMamba, poster",
        "method": twod["method"],
        "setting": "UNI features, 512 px at 20x",  # stated in the file's source line
        "backbone": "UNI",
        "task": twod["task"],
        "cohort": twod["dataset"],
        "metric": twod["metric"],
        "mean": twod["value"].astype(float),
        "std": np.nan,
    }))
    published = pd.concat(frames, ignore_index=True)
    published["cohort_key"] = published["cohort"].map(canonical_cohort)
    return published


def match_published(long: pd.DataFrame, published: pd.DataFrame, extractor: str | None) -> pd.DataFrame:
    """Reproduced rows beside published ones where cohort, task, metric and method agree."""
    if long.empty:
        return pd.DataFrame()
    ours = long.assign(cohort_key=long["cohort"].map(canonical_cohort),
                       method_key=long["paper_method"].map(paper_base_name))
    merged = ours.merge(
        published,
        left_on=["cohort_key", "task", "metric", "method_key"],
        right_on=["cohort_key", "task", "metric", "method"],
        suffixes=("", "_published"),
    )
    if merged.empty:
        return pd.DataFrame()
    backbone = EXTRACTOR_BACKBONES.get(extractor or "", extractor or "")
    return pd.DataFrame({
        "cohort": merged["cohort"],
        "task": merged["task"],
        "metric": merged["metric"],
        "method": merged["method"],
        "paper_method": merged["paper_method"],
        "reproduced_mean": merged["mean"],
        "reproduced_std": merged["std"],
        "published_mean": merged["mean_published"],
        "published_std": merged["std_published"],
        "difference": merged["mean"] - merged["mean_published"],
        "published_setting": merged["setting"],
        "published_backbone": merged["backbone"],
        "our_features": extractor or "",
        "same_features": merged["backbone"] == backbone,
        "source": merged["source"],
    })


def would_compare(long: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """For each reproduced task, metric and method: the published cohorts it could be set beside."""
    rows = []
    for (task, metric, method), _ in long.groupby(["task", "metric", "method"], sort=False):
        hits = published[(published.task == task) & (published.metric == metric)
                         & (published.method == paper_base_name(paper_name(method)))]
        if hits.empty:
            continue
        rows.append({
            "task": task,
            "metric": metric,
            "method": method,
            "paper_method": paper_name(method),
            "published_cohorts": ", ".join(sorted(hits["cohort"].unique())),
            "sources": "; ".join(sorted(hits["source"].unique())),
        })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: Path) -> list[Path]:
    paths = []
    for suffix in (".png", ".pdf"):
        path = stem.with_suffix(suffix)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def fold_figure(results: CohortResults, task: str, stem: Path) -> list[Path]:
    """The headline metric of each fold, per method, with the mean +/- std over folds."""
    import seaborn as sns

    plt = _pyplot()
    metric = results.primary_metric(task)
    frames = []
    for method in results.methods:
        folds = results.folds[(task, method)]
        frames.append(pd.DataFrame({"method": paper_name(method), "fold": folds["fold"].astype(str),
                                    "value": folds[metric]}))
    data = pd.concat(frames, ignore_index=True)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(results.methods), 3.6))
    sns.pointplot(data=data, x="method", y="value", errorbar="sd", color="black", linestyle="none",
                  markers="D", markersize=4, capsize=0.15, err_kws={"linewidth": 1.0}, ax=ax)
    # folds side by side at fixed offsets (dodge), not random jitter: the figure is the same on every run
    sns.stripplot(data=data, x="method", y="value", hue="fold", size=5, dodge=True, jitter=False, ax=ax,
                  palette="tab10")
    ax.set_xlabel("")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title(f"{results.name}: {task}, {METRIC_LABELS.get(metric, metric)} per fold (mean ± std)")
    ax.legend(title="fold", bbox_to_anchor=(1.01, 1), loc="upper left", frameon=False)
    ax.tick_params(axis="x", rotation=30)
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def _km_axes(ax, oof: pd.DataFrame, p_value: float, title: str) -> None:
    colours = {"high": "#c0392b", "low": "#2471a3"}
    for group in ("low", "high"):
        part = oof[oof["risk_group"] == group]
        if part.empty:
            continue
        km = M.kaplan_meier(part["time"].to_numpy(), part["event"].to_numpy())
        ax.step(km["time"], km["survival"], where="post", color=colours[group],
                label=f"{group} risk (n = {len(part)})")
        censored = km["censored"] > 0
        ax.plot(km["time"][censored], km["survival"][censored], "|", color=colours[group], markersize=7)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("time (days)")
    ax.set_ylabel("survival probability")
    ax.set_title(f"{title}\nlog-rank p = {_fmt_p(p_value)}")
    ax.legend(frameon=False, loc="lower left")


def km_figures(results: CohortResults, task: str, folder: Path) -> list[Path]:
    """One Kaplan-Meier figure per method, and one with a panel per method."""
    plt = _pyplot()
    paths = []
    for method in results.methods:
        summary = results.summaries[(task, method)]
        fig, ax = plt.subplots(figsize=(4.6, 3.8))
        _km_axes(ax, results.oof[(task, method)], summary["km"]["logrank_p"], f"{paper_name(method)} ({results.name})")
        paths += save_figure(fig, folder / f"km_{results.name}_{task}_{method}")
        plt.close(fig)
    n = len(results.methods)
    cols = min(n, 4)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, method in zip(axes.flat, results.methods):
        summary = results.summaries[(task, method)]
        _km_axes(ax, results.oof[(task, method)], summary["km"]["logrank_p"], paper_name(method))
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{results.name}: {task}, high vs low predicted risk (median split per fold)")
    fig.tight_layout()
    paths += save_figure(fig, folder / f"km_{results.name}_{task}")
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------


class Page:
    """Blocks written both as Markdown and as a standalone HTML page."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", level, text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: Iterable[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, frame: pd.DataFrame, markdown: str | None = None) -> None:
        self.blocks.append(("table", frame, markdown))

    def image(self, path: str, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out += ["#" * block[1] + " " + block[2], ""]
            elif kind == "p":
                out += [block[1], ""]
            elif kind == "ul":
                out += [f"- {item}" for item in block[1]] + [""]
            elif kind == "table":
                out += [block[2] if block[2] is not None else block[1].to_markdown(index=False), ""]
            elif kind == "img":
                out += [f"![{block[2]}]({block[1]})", ""]
        return "\n".join(out)

    def html(self) -> str:
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
                 "th,td{border-bottom:1px solid #ccc;padding:4px 8px;text-align:left}"
                 "img{max-width:100%;margin:0.5em 0}code{background:#f4f4f4}")
        out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(self.title)}</title>",
               f"<style>{style}</style></head><body>", f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                out.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                out.append(block[1].to_html(index=False, border=0, na_rep=""))
            elif kind == "img":
                out.append(f"<img src='{html.escape(block[1])}' alt='{html.escape(block[2])}'>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Markdown's `code` and **bold** in a line of text, as HTML."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)


def _fmt_p(p: float) -> str:
    return f"{p:.3g}" if np.isfinite(p) else "n/a"


# ----------------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------------


def expected_outputs(out_dir: str | Path, cohorts: Sequence[str], task_types: Mapping[str, str],
                     methods: Sequence[str]) -> dict[str, list[str]]:
    """Every file :func:`build_report` writes, by kind (the Snakemake rule declares these)."""
    out = Path(out_dir)
    tables = [out / "tables" / f"{stem}.{ext}" for stem in ["main", *task_types] for ext in ("csv", "md", "tex")]
    tables += [out / "tables" / f"{stem}.{ext}" for stem in ("comparisons", "published") for ext in ("csv", "md")]
    tables.append(out / "tables" / "long.csv")
    figures = []
    for cohort in cohorts:
        for task, kind in task_types.items():
            stems = [f"folds_{cohort}_{task}"]
            if kind == "survival":
                stems += [f"km_{cohort}_{task}"] + [f"km_{cohort}_{task}_{m}" for m in methods]
            figures += [out / "figures" / f"{s}.{ext}" for s in stems for ext in ("png", "pdf")]
    return {
        "page_html": [str(out / "index.html")],
        "page_md": [str(out / "index.md")],
        "tables_csv": [str(p) for p in tables if p.suffix == ".csv"],
        "tables_text": [str(p) for p in tables if p.suffix != ".csv"],
        "figures_png": [str(p) for p in figures if p.suffix == ".png"],
        "figures_pdf": [str(p) for p in figures if p.suffix == ".pdf"],
    }


def build_report(cohorts: Sequence[CohortResults], out_dir: str | Path, extractor: str | None = None,
                 published_dir: Path = PUBLISHED_DIR) -> list[Path]:
    out = Path(out_dir)
    tables_dir, figures_dir = out / "tables", out / "figures"
    written: list[Path] = []
    tasks = list(dict.fromkeys(t for c in cohorts for t in c.tasks))
    methods = list(dict.fromkeys(m for c in cohorts for m in c.methods))
    names = [c.name for c in cohorts]
    task_types = {t: next(c.task_type(t) for c in cohorts if t in c.tasks) for t in tasks}
    primary = {t: next(c.primary_metric(t) for c in cohorts if t in c.tasks) for t in tasks}

    long = long_table(cohorts)
    write_csv(tables_dir / "long.csv", long)
    written.append(tables_dir / "long.csv")
    main = wide_table(long, [(t, primary[t]) for t in tasks], names, methods)
    written += write_table(tables_dir, "main", main,
                           "Mean ± std over folds of each task's headline metric (best in bold).")
    task_tables = {}
    for task in tasks:
        found = set(long.loc[long.task == task, "metric"])
        order = [primary[task], *M.CLASSIFICATION_METRICS, *M.SURVIVAL_METRICS]
        metrics = [m for m in dict.fromkeys(order) if m in found]
        task_tables[task] = wide_table(long, [(task, m) for m in metrics], names, methods)
        written += write_table(tables_dir, task, task_tables[task], f"{task}: every metric, mean ± std over folds.")

    comparisons = pd.concat(
        [df.assign(cohort=c.name) for c in cohorts for df in c.comparisons.values()], ignore_index=True
    ) if any(c.comparisons for c in cohorts) else pd.DataFrame()
    write_csv(tables_dir / "comparisons.csv", comparisons)
    primary_cmp = comparisons[comparisons["primary"]] if not comparisons.empty else comparisons
    cmp_view = _comparison_view(primary_cmp)
    write_text(tables_dir / "comparisons.md", (cmp_view.to_markdown(index=False) if not cmp_view.empty
                                               else "No comparisons.") + "\n")
    written += [tables_dir / "comparisons.csv", tables_dir / "comparisons.md"]

    published = load_published(published_dir)
    matched = match_published(long, published, extractor)
    candidates = would_compare(long, published)
    write_csv(tables_dir / "published.csv", matched if not matched.empty else pd.DataFrame(
        columns=["cohort", "task", "metric", "method", "paper_method", "reproduced_mean", "reproduced_std",
                 "published_mean", "published_std", "difference", "published_setting", "published_backbone",
                 "our_features", "same_features", "source"]))
    pub_view = _published_view(matched)
    write_text(tables_dir / "published.md", (pub_view.to_markdown(index=False) if not pub_view.empty else
                                              "No published number matches these cohorts, tasks and methods.") + "\n")
    written += [tables_dir / "published.csv", tables_dir / "published.md"]

    figures: dict[tuple[str, str], list[Path]] = {}
    for c in cohorts:
        for task in c.tasks:
            figures[(c.name, f"folds_{task}")] = fold_figure(c, task, figures_dir / f"folds_{c.name}_{task}")
            if c.task_type(task) == "survival":
                figures[(c.name, f"km_{task}")] = km_figures(c, task, figures_dir)
    written += [p for paths in figures.values() for p in paths]

    page = _page(cohorts, long, main, task_tables, primary_cmp, matched, candidates, published, extractor,
                 task_types, primary)
    write_text(out / "index.md", page.markdown())
    write_text(out / "index.html", page.html())
    written += [out / "index.md", out / "index.html"]
    log.info("report: %d files under %s", len(written), out)
    return written


def _comparison_view(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return frame
    view = frame[frame["method"] != frame["best_method"]]
    return pd.DataFrame({
        "cohort": view["cohort"], "task": view["task"], "metric": view["metric"],
        "best": view["best_method"].map(paper_name), "method": view["method"].map(paper_name),
        "difference (best − method)": view["mean_diff"].map(lambda v: f"{v:.4f}"),
        "paired t p": view["t_p"].map(_fmt_p), "Wilcoxon p": view["wilcoxon_p"].map(_fmt_p),
        "folds": view["n_folds"],
    })


def _published_view(matched: pd.DataFrame) -> pd.DataFrame:
    if matched.empty:
        return matched
    return pd.DataFrame({
        "cohort": matched["cohort"], "task": matched["task"], "metric": matched["metric"],
        "method": matched["paper_method"],
        "reproduced": [fmt(m, s) for m, s in zip(matched["reproduced_mean"], matched["reproduced_std"])],
        "published": [fmt(m, s) for m, s in zip(matched["published_mean"], matched["published_std"])],
        "difference": matched["difference"].map(lambda v: f"{v:+.4f}"),
        "published features": matched["published_backbone"] + " (" + matched["published_setting"].astype(str) + ")",
        "same features": matched["same_features"].map({True: "yes", False: "no"}),
        "source": matched["source"],
    })


def _page(cohorts, long, main, task_tables, comparisons, matched, candidates, published, extractor,
          task_types, primary) -> Page:
    names = ", ".join(c.name for c in cohorts)
    page = Page(f"mambapath report: {names}")
    first = next(iter(cohorts[0].summaries.values()))
    boot = first["bootstrap"]
    page.text(
        f"Cohort(s) {names}; methods {', '.join(f'`{m}`' for m in cohorts[0].methods)}; "
        f"features `{extractor or 'unknown'}`. Each number is the mean ± standard deviation (ddof = 1) over "
        f"the test parts of {len(first['folds'])} patient-level folds, scored per {first['level']}. "
        f"Intervals are {boot['level'] * 100:g}% percentile bootstrap intervals of the mean over folds "
        f"({boot['resamples']} resamples of test patients within each fold, seed {boot['seed']})."
    )
    training = first.get("training")
    if training:
        # keys without a value (best_epoch under fixed_epochs) say nothing
        page.text("Training: " + ", ".join(f"{k} `{v}`" for k, v in training.items() if v is not None) + ".")
    page.items(f"`{t}`: {task_types[t]}, headline metric {METRIC_LABELS.get(primary[t], primary[t])}"
               for t in task_types)

    page.heading("Main table")
    page.text("Methods x (task, cohort), headline metric of each task; best in bold. Files: "
              "`tables/main.csv`, `tables/main.md`, `tables/main.tex`.")
    page.table(table_csv(main), table_markdown(main))

    page.heading("Headline metric with bootstrap intervals")
    view = long[long["primary"]].copy()
    view = pd.DataFrame({
        "cohort": view["cohort"], "task": view["task"], "method": view["paper_method"],
        "metric": view["metric"].map(lambda m: METRIC_LABELS.get(m, m)),
        "mean ± std": [fmt(m, s) for m, s in zip(view["mean"], view["std"])],
        f"{boot['level'] * 100:g}% CI": [f"[{lo:.4f}, {hi:.4f}]" if np.isfinite(lo) else "n/a"
                   for lo, hi in zip(view["ci_low"], view["ci_high"])],
        "folds": view["fold_values"],
        "log-rank p": view["logrank_p"].map(lambda p: _fmt_p(p) if np.isfinite(p) else ""),
    })
    page.table(view)

    for task, table in task_tables.items():
        page.heading(f"Task `{task}`: every metric", 3)
        page.text(f"Files: `tables/{task}.csv`, `tables/{task}.md`, `tables/{task}.tex`.")
        page.table(table_csv(table), table_markdown(table))

    page.heading("Paired comparisons with the best method")
    page.text("Fold-wise differences of the headline metric between the best method (highest mean) and each "
              "other method; two-sided paired t-test and Wilcoxon signed-rank test over folds (with 5 folds the "
              "smallest possible Wilcoxon p is 0.0625). All metrics: `tables/comparisons.csv`.")
    cmp_view = _comparison_view(comparisons)
    if cmp_view.empty:
        page.text("No comparisons (a single method, or none evaluated).")
    else:
        page.table(cmp_view)

    page.heading("Figures")
    for c in cohorts:
        for task in c.tasks:
            page.image(f"figures/folds_{c.name}_{task}.png", f"{task} per fold")
            if c.task_type(task) == "survival":
                page.text(f"Kaplan-Meier curves of `{task}`: test patients of all folds, split at the median "
                          "predicted risk of their fold; log-rank test between the halves. One figure per method: "
                          f"`figures/km_{c.name}_{task}_<method>.png`.")
                page.image(f"figures/km_{c.name}_{task}.png", f"Kaplan-Meier {task}")

    page.heading("Reproduced beside published")
    if not matched.empty:
        page.text("Where cohort, task, metric and method match a published table. The published numbers depend on "
                  "the feature extractor, shown beside them; only rows with the same features compare like for like.")
        page.table(_published_view(matched))
    else:
        page.text(f"No published number matches cohort(s) {names}: the papers report on TCGA cohorts "
                  f"({', '.join(sorted(published['cohort_key'].unique()))}). Run a TCGA cohort to fill this table.")
        if not candidates.empty:
            page.text("What would be compared, for these tasks and methods:")
            page.table(candidates)
    page.text("Method names: " + ", ".join(f"`{ours}` = {theirs}" for ours, theirs in PAPER_METHOD_NAMES.items())
              + ". Sources: `src/mambapath/data/published/README.md`.")
    return page


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval", action="append", required=True, metavar="COHORT=DIR",
                        help="a cohort's evaluation folder (results/<cohort>/eval); repeat for several cohorts")
    parser.add_argument("--out-dir", required=True, help="report folder (results/<cohort>/report)")
    parser.add_argument("--tasks", nargs="+", help="tasks, in table order (default: every task found)")
    parser.add_argument("--methods", nargs="+", help="methods, in table order (default: every method found)")
    parser.add_argument("--extractor", help="feature extractor the methods used (config features.extractor)")


def run(args: argparse.Namespace) -> int:
    cohorts = []
    for item in args.eval:
        if "=" in item:
            name, folder = item.split("=", 1)
        else:
            folder = item
            name = Path(item).resolve().parent.name
        cohorts.append(load_cohort_results(name, folder, args.tasks, args.methods))
    build_report(cohorts, args.out_dir, args.extractor)
    return 0

"""Chapter 7's tables: DataFrames of medians with percentile-bootstrap 95% intervals.

Every function takes the runs of one split from :func:`mrilib.grid.load_results` (one
row per training run; two splits are two protocols and are never mixed in one table). Intervals are of the median over repeats (:mod:`mrilib.stats`),
hierarchical where repeats share a real sample or generator. A table whose cells are
not in the results yet raises :class:`mrilib.plots.results.MissingCells` naming them.
The figures that show these numbers (:mod:`mrilib.plots.results`) call these functions.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import stats
from ..plots.results import (AUG_LABELS, PRIMARY, MissingCells, metric_label, model_label,
                             split_of)

# Kwon (2024) ch. 7.2: basic CNN, median validation cross-entropy over repeats.
THESIS_NUMBERS = pd.DataFrame([
    {"setting": "30% real", "synthetic": "none", "real_fraction": 0.3, "thesis": 0.219863},
    {"setting": "100% real", "synthetic": "none", "real_fraction": 1.0, "thesis": 0.176023},
    {"setting": "30% real + 70% synthetic", "synthetic": "fill", "real_fraction": 0.3,
     "thesis": 0.174202},
])
# The thesis's results table (ch. 7.2): its rows as (synthetic policy, real fraction).
TABLE_ROWS = {
    "100% real / 0% synthetic": ("none", 1.0),
    "80% real / 20% synthetic": ("fill", 0.8),
    "100% real / 20% synthetic (ModerateDemented only)": ("100+20mod", 1.0),
}
# The thesis's three claims as paired comparisons of its basic-CNN cells (first - second).
THESIS_PAIRS = (
    ("30% real + 70% synthetic vs 100% real",
     {"synthetic": "fill", "real_fraction": 0.3}, {"synthetic": "none", "real_fraction": 1.0}),
    ("30% real vs 100% real",
     {"synthetic": "none", "real_fraction": 0.3}, {"synthetic": "none", "real_fraction": 1.0}),
    ("30% real + 70% synthetic vs 30% real",
     {"synthetic": "fill", "real_fraction": 0.3}, {"synthetic": "none", "real_fraction": 0.3}),
)


# ----------------------------------------------------------------------------- helpers

def min_clusters() -> int:
    """Independent samples a verdict needs (:mod:`mrilib.stats`' ``min_clusters``)."""
    from ..config import settings

    return settings(stats.DEFAULTS, stats.PRESETS)["min_clusters"]


def thesis_metric(metric: str | None = None) -> str:
    """The thesis's measure, the last epoch's validation cross-entropy, whatever else a
    report leads with: a test metric is not set beside the thesis's numbers."""
    return "final_val_loss"


def format_interval(estimate: float, low: float, high: float, n: int | None = None,
                    digits: int = 4) -> str:
    """``"0.1760 [0.1712, 0.1801]"`` (and ``" n=20"`` when ``n`` is given)."""
    text = f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return text if n is None else f"{text} n={n}"


def cell_estimate(runs, metric, n_boot, seed, **cell
                  ) -> tuple[tuple[float, float, float, int], int] | None:
    """((median, low, high, n), independent real samples) of a cell; None if not run."""
    sel = stats.select_cell(runs, **cell)
    if sel.empty:
        return None
    clusters = stats.cluster_ids(sel)
    iv = stats.bootstrap_median(stats.metric_values(sel, metric), clusters,
                                n_boot=n_boot, seed=seed)
    return (iv.estimate, iv.low, iv.high, len(sel)), len(set(clusters))


def cell_interval(runs, metric, n_boot, seed, **cell) -> tuple[float, float, float, int] | None:
    """(median, low, high, n) of a cell; None if not run."""
    found = cell_estimate(runs, metric, n_boot, seed, **cell)
    return found[0] if found else None


def leak_free_effects(runs: pd.DataFrame, metric: str = PRIMARY,
                      n_boot: int | None = None, seed: int | None = None) -> pd.DataFrame:
    """:func:`mrilib.stats.synthetic_effects` of the cells whose generator is leak-free."""
    effects = stats.synthetic_effects(runs, metric, n_boot=n_boot, seed=seed)
    return effects[effects["leakage"] == "sample"].copy() if len(effects) else effects


# ----------------------------------------------------------------------------- the thesis's

def results_table(runs: pd.DataFrame, model: str = "basic_cnn", metric: str = PRIMARY,
                  n_boot: int | None = None, seed: int | None = None) -> pd.DataFrame:
    """The thesis's results table for one architecture: median [95% interval] n per cell.

    Rows: 100% real / 0% synthetic, 80% real / 20% synthetic, 100% real / 20% synthetic
    (ModerateDemented only); columns: the augmentation policies. "-" where not yet run;
    ", k samples" where a cell's repeats rest on fewer than ``min_clusters`` real samples
    (a partly run cell), whose interval then misses the variation between samples.
    """
    split_of(runs)
    table = {row: {label: _table_cell(runs, metric, n_boot, seed, model=model, aug=aug,
                                      synthetic=synthetic, real_fraction=fraction)
                   for aug, label in AUG_LABELS.items()}
             for row, (synthetic, fraction) in TABLE_ROWS.items()}
    out = pd.DataFrame(table).T
    out.index.name = f"{model_label(runs, model)}: median {metric_label(metric)}"
    return out


def _table_cell(runs, metric, n_boot, seed, **cell) -> str:
    found = cell_estimate(runs, metric, n_boot, seed, **cell)
    if not found:
        return "-"
    interval, samples = found
    text = format_interval(*interval)
    if samples < min_clusters():  # an interval within too few samples
        text += f", {samples} sample{'s' * (samples != 1)}"
    return text


def thesis_comparison(runs: pd.DataFrame, metric: str = PRIMARY,
                      n_boot: int | None = None, seed: int | None = None) -> pd.DataFrame:
    """The thesis's three basic-CNN numbers beside ours: median, interval, runs (``n``),
    distinct real samples (``samples``: 1 at 100% real, where runs differ by seed only),
    the units the interval rests on (``units``), and the ratio.

    Always the thesis's measure, the last epoch's validation cross-entropy. A side-by-side,
    not a test of agreement: our interval covers run-to-run variation under our protocol,
    so another protocol's number falls outside it whether or not the claims agree.
    """
    split_of(runs)
    metric = thesis_metric(metric)
    rows = []
    for _, ref in THESIS_NUMBERS.iterrows():
        cell = dict(model="basic_cnn", aug="none", synthetic=ref["synthetic"],
                    real_fraction=ref["real_fraction"])
        found = cell_estimate(runs, metric, n_boot, seed, **cell)
        (median, low, high, n), units = found if found else ((np.nan, np.nan, np.nan, 0), 0)
        samples = stats.sample_count(stats.select_cell(runs, **cell)) if n else 0
        rows.append({"setting": ref["setting"], "thesis": ref["thesis"], "ours": median,
                     "low": low, "high": high, "n": n, "samples": samples, "units": units,
                     "ours / thesis": median / ref["thesis"]})
    return pd.DataFrame(rows).set_index("setting")


def thesis_differences(runs: pd.DataFrame, metric: str = PRIMARY,
                       n_boot: int | None = None, seed: int | None = None) -> pd.DataFrame:
    """The thesis's three claims as differences with 95% intervals (basic CNN, no augmentation).

    First minus second: the median of the per-repeat differences where the cells are
    paired, else the difference of their medians; a pair not run yet is left out.
    """
    split_of(runs)
    metric = thesis_metric(metric)
    headline = {"model": "basic_cnn", "aug": "none"}
    rows = []
    for label, a, b in THESIS_PAIRS:
        try:
            c = stats.compare_cells(runs, {**headline, **a}, {**headline, **b}, metric,
                                    n_boot=n_boot, seed=seed)
        except ValueError:
            continue
        rows.append({"comparison": label, "difference": format_interval(
            c["difference"], c["low"], c["high"]), "paired": c["paired"],
            "distinguishable from noise": c["distinguishable"]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- synthetic effect

def verdict(row) -> str:
    """How a loss difference (synthetic - real only) reads: helped, hurt or neither."""
    needed = min_clusters()
    if row["clusters"] < needed:
        return f"too few independent samples to tell ({row['clusters']} < {needed})"
    if not row["distinguishable"]:
        return "no distinguishable difference"
    return "helped (lower loss)" if row["difference"] < 0 else "hurt (higher loss)"


def effects_table(runs: pd.DataFrame, metric: str = PRIMARY, n_boot: int | None = None,
                  seed: int | None = None) -> pd.DataFrame:
    """Did synthetic images help? One row per synthetic cell against its real-only twin.

    Same architecture, augmentation and real fraction, leak-free generator, paired by
    real sample; the difference is the median of the per-repeat differences, synthetic
    minus real only, with its 95% interval and a verdict that needs ``min_clusters``
    independent samples (:mod:`mrilib.stats`). "real only" and "with synthetic" are the
    medians of the same repeats.
    """
    split_of(runs)
    effects = leak_free_effects(runs, metric, n_boot, seed)
    if effects.empty:
        raise MissingCells("effects_table: no synthetic cell with a leak-free generator has "
                           "its real-only twin (same architecture, augmentation, real "
                           "fraction) in the results yet")
    effects["architecture"] = [model_label(runs, m) for m in effects["model"]]
    effects["real %"] = (effects["real_fraction"] * 100).round().astype(int)
    effects["synthetic - real only"] = [format_interval(d, lo, hi) for d, lo, hi in
                                        zip(effects["difference"], effects["low"], effects["high"])]
    effects["verdict"] = effects.apply(verdict, axis=1)
    effects = effects.sort_values(["model", "aug", "synthetic", "real_fraction"])
    return effects[["architecture", "aug", "synthetic", "real %", "median_b", "median_a",
                    "synthetic - real only", "paired", "clusters", "verdict"]].rename(
        columns={"median_b": "real only", "median_a": "with synthetic"}).reset_index(drop=True)


def leakage_table(runs: pd.DataFrame, metric: str = PRIMARY, n_boot: int | None = None,
                  seed: int | None = None) -> pd.DataFrame:
    """Each leaky-generator cell beside its leak-free twin and its real-only twin."""
    split_of(runs)
    if not (runs["leakage"] == "leaky").any():
        raise MissingCells("leakage_table: no leaky-generator runs in the results yet")
    keys = runs[runs["leakage"] == "leaky"].drop_duplicates(["model", "aug", "real_fraction"])
    return pd.DataFrame([_leakage_row(runs, key, metric, n_boot, seed)
                         for _, key in keys.iterrows()])


def _leakage_row(runs, key, metric, n_boot, seed) -> dict:
    cell = {"model": key["model"], "aug": key["aug"], "real_fraction": key["real_fraction"]}
    row = {"model": model_label(runs, cell["model"]), "aug": cell["aug"],
           "real": f"{cell['real_fraction']:.0%}"}
    for name, spec in (("real only", {"synthetic": "none"}),
                       ("leak-free generator", {"synthetic": "fill", "leakage": "sample"}),
                       ("leaky generator", {"synthetic": "fill", "leakage": "leaky"})):
        found = cell_interval(runs, metric, n_boot, seed, **cell, **spec)
        row[name] = format_interval(*found) if found else "-"
    twin = {**cell, "synthetic": "fill", "leakage": "sample"}
    if not stats.select_cell(runs, **twin).empty:
        diff = stats.compare_cells(runs, {**cell, "synthetic": "fill", "leakage": "leaky"},
                                   twin, metric, n_boot=n_boot, seed=seed)
        row["leaky - leak-free"] = format_interval(diff["difference"], diff["low"], diff["high"])
        row["distinguishable"] = diff["distinguishable"]
    return row


# ----------------------------------------------------------------------------- every cell

def classification_table(runs: pd.DataFrame, split: str = "test", stage: str = "best",
                         n_boot: int | None = None, seed: int | None = None) -> pd.DataFrame:
    """Accuracy, balanced accuracy, macro-F1 and recall of every class per cell: median
    [95% interval].

    From the ``<stage>_<split>_confusion`` matrices of the runs (the test split at each
    run's epoch selected on validation, by default); one row per cell, ``n`` runs each.
    """
    split_of(runs)
    column = f"{stage}_{split}_confusion"
    if column not in runs:
        raise ValueError(f"classification_table: the runs carry no {column} column; "
                         f"choose split='test' or 'val' and stage='final' or 'best'")
    runs = stats.with_confusion_metrics(runs) if f"{stage}_{split}_macro_f1" not in runs else runs
    prefix = f"{stage}_{split}_"
    metrics = [prefix + "accuracy", prefix + "balanced_accuracy", prefix + "macro_f1",
               *[c for c in runs.columns if c.startswith(prefix + "recall_")]]
    summary = stats.cell_summary(runs, metrics=metrics, n_boot=n_boot, seed=seed)
    out = pd.DataFrame({"architecture": [model_label(runs, m) for m in summary["model"]],
                        "aug": summary["aug"], "synthetic": summary["synthetic"],
                        "real": [f"{x:.0%}" for x in summary["real_fraction"]],
                        "leakage": summary["leakage"], "n": summary["n"]})
    for metric in metrics:
        name = metric[len(prefix):].replace("recall_", "recall ").replace("_", " ")
        out[name] = ["-" if e != e else format_interval(e, lo, hi, digits=3) for e, lo, hi in
                     zip(summary[metric], summary[f"{metric}_low"], summary[f"{metric}_high"])]
    return out


def cells_table(runs: pd.DataFrame, n_boot: int | None = None,
                seed: int | None = None) -> pd.DataFrame:
    """Every cell: its repeats, independent samples, diverged runs, and each metric's
    median [95% interval] (:func:`mrilib.stats.cell_summary`)."""
    split_of(runs)
    summary = stats.cell_summary(runs, n_boot=n_boot, seed=seed)
    shown = summary[[*stats.cell_columns(summary), "n", "samples", "clusters", "diverged",
                     "init"]].copy()
    shown["real_fraction"] = [f"{x:.0%}" for x in shown["real_fraction"]]
    for metric in stats.default_metrics(runs):
        shown[metric] = [format_interval(e, lo, hi, digits=3) for e, lo, hi in
                         zip(summary[metric], summary[f"{metric}_low"], summary[f"{metric}_high"])]
    return shown

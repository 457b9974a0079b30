"""Medians over repeats, their bootstrap intervals, and which differences are real.

The thesis reports one number per cell of the grid: the median validation
cross-entropy over 20 training runs. This module adds what a reader needs to trust a
difference between two such numbers:

* **metrics from confusion matrices** (rows = true class, columns = predicted, as
  :func:`mrilib.train.train_replicates` records them): accuracy, macro-F1 and
  per-class recall. Moderate_Demented has 64 images in all; with the fixed split of
  :func:`mrilib.splits.split_mri` the test split holds 13 of its 1,280 images (and the
  validation split 5 of 512), so its recall moves in steps of 1/13 and rests on 13
  slices whatever the number of repeats (see "what the intervals cover").
* **percentile-bootstrap intervals** for medians and for differences between cells
  (paired: the median of per-repeat differences; unpaired: the difference of medians),
  with an explicit seed and ``n_boot`` resamples.
* **clustering**: repeats of one cell are not independent where they share a real
  sample or a generator (repeat ``r`` uses sample/generator ``r mod G``, see
  :mod:`mrilib.grid`). There the bootstrap is hierarchical: resample the
  ``G`` clusters, then the repeats inside each drawn cluster.
* **pairing**: two cells at the same real fraction share their real samples (and
  training seeds) repeat by repeat. Their comparison is the median of the per-repeat
  differences, bootstrapped over pairs (clusters, then pairs): a sample that is easy for
  one cell is easy for the other, and the difference cancels it. (The difference of
  the two medians would not: the two medians usually fall on different samples, and a
  simulation with this grid's spread found it detecting a shift of one within-sample
  standard deviation 22% of the time against 54% for the paired median.) Unpaired
  cells are compared by the difference of their medians, each side resampled alone.
* **what the intervals cover**: the variation between training runs (real samples,
  generators, initial weights, batch order) on the one fixed split. They do not cover
  the finite validation and test sets: a recall of 13/13 on 13 test slices has an
  interval of [1, 1] when every run gets them all, although the true recall could be
  well below 1 (an exact binomial 95% lower bound for 13/13 is 0.75). With G = 5
  independent samples, percentile intervals cover somewhat less than their nominal 95%
  (about 90-93% in simulation).

A difference is called *distinguishable from noise* when its interval excludes 0 and
it rests on at least ``min_clusters`` independent units (clusters): with G = 5
real samples (and generators), a cell below 100% real or with synthetic images has 5
independent units, not 20 (a 100% real-only cell has 20: every repeat sees the pool).

Kept as one module (over 500 lines): the bootstrap primitives and the cell comparisons
built on them share their resampling rules and are read together.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from .config import settings

DEFAULTS = {
    "n_boot": 10_000,     # bootstrap resamples; Monte Carlo error of a 2.5% quantile is ~0.2% of B
    "level": 0.95,        # two-sided interval coverage
    "seed": 20240601,     # bootstrap seed: the same table comes out on every rerun
    "metric": "final_val_loss",  # the thesis's measure: median validation cross-entropy
    # Independent units (clusters) a comparison needs before a difference is called
    # distinguishable: a percentile bootstrap over 2-4 units covers far below its level.
    "min_clusters": 5,
}
PRESETS = {
    "quick": {"n_boot": 500},   # tests and seminars: intervals to within ~1% of B=10,000
    "cell": {"n_boot": 2_000},
}

# The columns that identify one cell of the grid (see mrilib.grid.Cell).
CELL_COLUMNS = ("split", "model", "aug", "synthetic", "real_fraction", "leakage")


def cell_columns(runs: pd.DataFrame) -> list[str]:
    """The cell columns ``runs`` has (a table made by hand may leave some out)."""
    return [c for c in CELL_COLUMNS if c in runs.columns]


class Interval(NamedTuple):
    """A point estimate with its bootstrap interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below 0."""
        return bool(self.low > 0 or self.high < 0)


# ----------------------------------------------------------------------------- confusion metrics

def _confusions(confusion) -> np.ndarray:
    """``confusion`` as a float array [..., C, C]; a ValueError for anything else."""
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim < 2 or conf.shape[-1] != conf.shape[-2]:
        raise ValueError(f"a confusion matrix must be square [C, C] (or a stack [N, C, C]), "
                         f"got shape {list(conf.shape)}")
    if (conf < 0).any():
        raise ValueError("a confusion matrix holds counts; it has negative entries")
    return conf


def accuracy(confusion) -> np.ndarray:
    """Share of correct predictions: trace / total (per matrix of a stack)."""
    conf = _confusions(confusion)
    return np.trace(conf, axis1=-2, axis2=-1) / conf.sum(axis=(-2, -1))


def class_recall(confusion) -> np.ndarray:
    """Recall per class [..., C]; NaN for a class with no true images."""
    conf = _confusions(confusion)
    support = conf.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diagonal(conf, axis1=-2, axis2=-1) / support


def balanced_accuracy(confusion) -> np.ndarray:
    """Mean recall over the classes present in the true labels (chance: 1 / classes)."""
    return np.nanmean(class_recall(confusion), axis=-1)


def macro_f1(confusion) -> np.ndarray:
    """Unweighted mean of per-class F1 over the classes present in the true labels.

    A class that is present but never predicted has precision 0 and F1 0 (as
    scikit-learn's ``zero_division=0``), so a model that ignores Moderate_Demented is
    penalised for it; a class absent from the true labels is left out of the mean.
    """
    conf = _confusions(confusion)
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    support, predicted = conf.sum(axis=-1), conf.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    f1 = np.where(support > 0, f1, np.nan)
    return np.nanmean(f1, axis=-1)


# ----------------------------------------------------------------------------- bootstrap

def _resampled_index(groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, L] indices into the data, -1 for padding: clusters first, then members.

    Each row draws as many clusters as there are (with replacement), then inside each
    drawn cluster as many members as it has (with replacement). With every observation
    its own cluster this is the ordinary bootstrap.
    """
    _, cluster = np.unique(groups, return_inverse=True)
    order = np.argsort(cluster, kind="stable")
    sizes = np.bincount(cluster)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_clusters, widest = len(sizes), int(sizes.max())
    drawn = rng.integers(n_clusters, size=(n_boot, n_clusters))
    drawn_sizes = sizes[drawn][..., None]
    within = np.floor(rng.random((n_boot, n_clusters, widest)) * drawn_sizes).astype(np.int64)
    index = order[np.minimum(starts[drawn][..., None] + within, len(order) - 1)]
    index = np.where(np.arange(widest) < drawn_sizes, index, -1)
    return index.reshape(n_boot, n_clusters * widest)


def _medians_at(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Median of ``values`` over each row of ``index`` (-1 entries ignored).

    A median that falls between +inf and -inf (paired differences where each cell
    diverged on other repeats) is taken as 0, as two diverged runs differ by 0.
    """
    picked = np.where(index >= 0, values[np.maximum(index, 0)], np.nan)
    with np.errstate(invalid="ignore"):
        med = np.nanmedian(picked, axis=1)
    both = np.isposinf(picked).any(axis=1) & np.isneginf(picked).any(axis=1)
    return np.where(np.isnan(med) & both, 0.0, med)


def _unit_draws(units: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, U] how often each of the U units is drawn when U are drawn with replacement."""
    return rng.multinomial(len(units), np.full(len(units), 1 / len(units)), size=n_boot)


def _pair_weights(draws: np.ndarray, units: np.ndarray, first, second) -> np.ndarray:
    """[n_boot, pairs] w_i * w_j: each pair counts once per way of drawing both its units.

    This resamples the units of pairs drawn from one set (a vertex bootstrap; Owen 2007
    treats the crossed case of two sets). Written by hand, as no bootstrap in scipy or
    elsewhere handles data on pairs: pairs that share a unit share its draws, so the
    interval widens as it should, where resampling the pairs themselves treats them as
    independent and is too narrow (tests/test_stats.py simulates both).
    """
    # units come sorted from np.unique: a unit's column is its place among them
    return (draws[:, np.searchsorted(units, np.asarray(first).ravel())]
            * draws[:, np.searchsorted(units, np.asarray(second).ravel())])


def _pair_medians(values: np.ndarray, first, second, n_boot: int,
                  rng: np.random.Generator) -> np.ndarray:
    """[n_boot] medians of values of pairs of units, resampling the units (NaN: no pair drawn)."""
    units = np.unique(np.concatenate([np.asarray(first).ravel(), np.asarray(second).ravel()]))
    return _weighted_medians(values, _pair_weights(_unit_draws(units, n_boot, rng), units,
                                                   first, second))


def _cluster_weights(draws: np.ndarray, units: np.ndarray, groups: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n] weights of values clustered by unit: a unit drawn w times contributes
    w * (its size) draws among its own values, as w independent resamples of them would."""
    weights = np.zeros((draws.shape[0], groups.size), dtype=np.int64)
    for unit in np.unique(groups):
        members = np.flatnonzero(groups == unit)
        w = draws[:, np.searchsorted(units, unit)]
        weights[:, members] = rng.multinomial(w * members.size,
                                              np.full(members.size, 1 / members.size))
    return weights


def _weighted_medians(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of integer ``weights``, the median of ``values`` repeated that many times."""
    order = np.argsort(values, kind="stable")
    v, c = values[order], np.cumsum(weights[:, order], axis=1)
    total = c[:, -1]
    # 1-based positions ceil(T/2) and floor(T/2)+1: the middle one or the middle two
    lo = np.argmax(c >= ((total + 1) // 2)[:, None], axis=1)
    hi = np.argmax(c >= (total // 2 + 1)[:, None], axis=1)
    return np.where(total > 0, (v[lo] + v[hi]) / 2, np.nan)


def bootstrap_median_of_pairs(values, first, second, n_boot: int | None = None,
                              level: float | None = None, seed: int | None = None) -> Interval:
    """The median of values measured on pairs of units (``first[k]``, ``second[k]``).

    Such as an agreement between two scans, where one scan is in several pairs: the
    bootstrap resamples the units, not the pairs (:func:`_pair_medians`).
    """
    cfg = settings(DEFAULTS, PRESETS, **_given(n_boot=n_boot, level=level, seed=seed))
    x, _ = _clean(values, None, "bootstrap_median_of_pairs")
    _finite_for_pairs(x, "bootstrap_median_of_pairs")
    if np.size(first) != x.size or np.size(second) != x.size:
        raise ValueError(f"bootstrap_median_of_pairs: {np.size(first)} and {np.size(second)} "
                         f"unit ids for {x.size} values; give both units of every pair")
    boot = _pair_medians(x, first, second, cfg["n_boot"], np.random.default_rng(cfg["seed"]))
    return Interval(float(np.median(x)), *_bounds(boot[~np.isnan(boot)], cfg["level"]))


def _finite_for_pairs(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: values of pairs must be finite; {int((~np.isfinite(x)).sum())}"
                         f" are not (drop them first)")


def _clean(values, groups, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name}: no values to summarise; the cell has no finished runs")
    if np.isnan(x).any():
        raise ValueError(f"{name}: {int(np.isnan(x).sum())} value(s) are NaN; a diverged run's "
                         f"loss counts as +inf (metric_values does that), anything else must "
                         f"be dropped explicitly before summarising")
    g = np.arange(x.size) if groups is None else np.asarray(groups).ravel()
    if g.size != x.size:
        raise ValueError(f"{name}: {g.size} group ids for {x.size} values; give one per value")
    return x, g


def _bounds(boot: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level={level}: give a coverage in (0, 1), e.g. 0.95")
    tail = (1 - level) / 2
    with np.errstate(invalid="ignore"):
        low, high = np.quantile(boot, [tail, 1 - tail])
    # Interpolating between two infinities (diverged runs) gives NaN; the bound is that
    # infinity, the neighbour on the outer side.
    if np.isnan(low):
        low = np.quantile(boot, tail, method="lower")
    if np.isnan(high):
        high = np.quantile(boot, 1 - tail, method="higher")
    return float(low), float(high)


def bootstrap_median(values, groups=None, n_boot: int | None = None, level: float | None = None,
                     seed: int | None = None) -> Interval:
    """The median of ``values`` with its percentile-bootstrap interval.

    ``groups`` gives a cluster id per value (e.g. the real sample / generator a repeat
    used); the bootstrap then resamples clusters, then repeats within them.
    """
    cfg = settings(DEFAULTS, PRESETS, **_given(n_boot=n_boot, level=level, seed=seed))
    x, g = _clean(values, groups, "bootstrap_median")
    rng = np.random.default_rng(cfg["seed"])
    boot = _medians_at(x, _resampled_index(g, cfg["n_boot"], rng))
    return Interval(float(np.median(x)), *_bounds(boot, cfg["level"]))


def bootstrap_median_difference(a, b, groups_a=None, groups_b=None, paired: bool = False,
                                n_boot: int | None = None, level: float | None = None,
                                seed: int | None = None, pairs_b=None) -> Interval:
    """How much ``a`` exceeds ``b``, with its percentile-bootstrap interval.

    Unpaired: median(a) - median(b), each side resampled on its own (hierarchically
    where groups are given). ``pairs_b=(first, second)``: each ``b`` is measured on a pair
    of units and ``groups_a`` names units of the same set (such as Grad-CAM agreements of
    scan pairs against variations clustered by their source scan): the units are then
    drawn once per replicate for both sides, since sides that share units co-vary; ``a``'s
    values are resampled within their units as above. ``paired=True`` means ``a[i]`` and
    ``b[i]`` share their real sample (cluster ``groups_a[i]``): the estimate is then the
    median of the differences a[i] - b[i], resampled by pairs, so that what the pair
    shares cancels.
    Two equal infinities (both runs diverged) differ by 0.
    """
    cfg = settings(DEFAULTS, PRESETS, **_given(n_boot=n_boot, level=level, seed=seed))
    xa, ga = _clean(a, groups_a, "bootstrap_median_difference (a)")
    xb, gb = _clean(b, groups_b, "bootstrap_median_difference (b)")
    rng = np.random.default_rng(cfg["seed"])
    if paired and pairs_b is not None:
        raise ValueError("pairs_b describes unpaired sides; drop paired=True or pairs_b")
    if paired:
        if xa.size != xb.size:
            raise ValueError(f"paired comparison needs one b per a; got {xa.size} and {xb.size}")
        d = _minus(xa, xb)
        boot = _medians_at(d, _resampled_index(ga, cfg["n_boot"], rng))
        whole = _medians_at(d, np.arange(d.size)[None])[0]
        return Interval(float(whole), *_bounds(boot, cfg["level"]))
    if pairs_b is None:
        boot = _minus(_medians_at(xa, _resampled_index(ga, cfg["n_boot"], rng)),
                      _medians_at(xb, _resampled_index(gb, cfg["n_boot"], rng)))
    else:
        boot = _shared_unit_differences(xa, ga, xb, pairs_b, groups_b, cfg["n_boot"], rng)
    return Interval(float(_minus(np.median(xa), np.median(xb))), *_bounds(boot, cfg["level"]))


def _shared_unit_differences(xa, ga, xb, pairs_b, groups_b, n_boot: int,
                              rng: np.random.Generator) -> np.ndarray:
    """Bootstrap differences of medians where a is clustered by units and b is on pairs."""
    if groups_b is not None:
        raise ValueError("pairs_b gives b's units; drop groups_b")
    first, second = (np.asarray(u).ravel() for u in pairs_b)
    if first.size != xb.size or second.size != xb.size:
        raise ValueError(f"pairs_b: {first.size} and {second.size} unit ids for "
                         f"{xb.size} values of b; give both units of every pair")
    _finite_for_pairs(np.concatenate([xa, xb]), "bootstrap_median_difference with pairs_b")
    units = np.unique(np.concatenate([ga, first, second]))
    draws = _unit_draws(units, n_boot, rng)
    boot_a = _weighted_medians(xa, _cluster_weights(draws, units, ga, rng))
    boot_b = _weighted_medians(xb, _pair_weights(draws, units, first, second))
    keep = ~(np.isnan(boot_a) | np.isnan(boot_b))  # a replicate that drew no unit of a side
    return boot_a[keep] - boot_b[keep]


def _minus(x, y):
    """x - y, with 0 where both are the same infinity (two diverged runs: no difference)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(x) & (x == y), 0.0, x - y)


def _given(**kwargs):
    return {k: v for k, v in kwargs.items() if v is not None}


# ----------------------------------------------------------------------------- runs tables

def with_confusion_metrics(runs: pd.DataFrame, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """``runs`` plus accuracy, macro-F1 and per-class recall columns from each confusion.

    For every ``<stage>_<split>_confusion`` column (e.g. ``best_test_confusion``) adds
    ``<stage>_<split>_macro_f1``, ``<stage>_<split>_balanced_accuracy`` and
    ``<stage>_<split>_recall_<class>``; accuracy is recomputed from the matrix as
    ``<stage>_<split>_accuracy``.
    """
    out = runs.copy()
    classes = list(classes or _classes_of(runs))
    for col in [c for c in runs.columns if c.endswith("_confusion")]:
        stem = col[: -len("_confusion")]
        conf = np.stack([np.asarray(m, dtype=np.float64) for m in runs[col]])
        if conf.shape[-1] != len(classes):
            raise ValueError(f"{col} holds {conf.shape[-1]}x{conf.shape[-1]} matrices but "
                             f"{len(classes)} class names were given: {classes}")
        out[f"{stem}_accuracy"] = accuracy(conf)
        out[f"{stem}_balanced_accuracy"] = balanced_accuracy(conf)
        out[f"{stem}_macro_f1"] = macro_f1(conf)
        for name, recall in zip(classes, class_recall(conf).T):
            out[f"{stem}_recall_{name}"] = recall
    return out


def split_support(runs: pd.DataFrame, column: str = "final_test_confusion") -> pd.Series:
    """Images per true class in the split a confusion column was measured on.

    Every run of one results table is evaluated on the same split, so every row must
    give the same counts; different counts mean tables of two splits were mixed.
    """
    if column not in runs or runs.empty:
        raise ValueError(f"split_support: the runs table has no {column!r} values")
    support = np.stack([np.asarray(m, dtype=np.int64).sum(axis=-1) for m in runs[column]])
    if (support != support[0]).any():
        raise ValueError(f"{column}: runs disagree on the images per class "
                         f"({sorted({tuple(s) for s in support.tolist()})}); the table mixes "
                         f"results of different splits or data shares")
    return pd.Series(support[0], index=_classes_of(runs), name=column)


def _classes_of(runs: pd.DataFrame) -> list[str]:
    """The class names of ``runs``: the one class list its ``classes`` column agrees on.

    Rows without a list (NaN or None, e.g. after concatenating a table that has no such
    column) are skipped; a ValueError names the column when the rows that have one
    disagree, or when none has one. A table without the column (or without rows) gets
    :data:`mrilib.data.CLASSES`.
    """
    if "classes" not in runs.columns or not len(runs):
        from .data import CLASSES
        return list(CLASSES)
    lists = []
    for value in runs["classes"]:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ValueError(f"column 'classes' holds {value!r}; each row needs the list of "
                             f"class names (e.g. {list(_default_classes())})")
        names = tuple(str(v) for v in value)
        if names not in lists:
            lists.append(names)
    if not lists:
        raise ValueError(f"column 'classes' has no class list in any of the {len(runs)} "
                         f"rows; fill it (e.g. {list(_default_classes())}) or pass "
                         f"classes=... explicitly")
    if len(lists) > 1:
        raise ValueError(f"column 'classes' disagrees between rows: "
                         f"{' vs '.join(map(str, map(list, lists)))}; the table mixes "
                         f"results of different datasets or class orders")
    return list(lists[0])


def _default_classes() -> tuple[str, ...]:
    from .data import CLASSES
    return tuple(CLASSES)


def sample_count(runs: pd.DataFrame) -> int:
    """Distinct real samples among ``runs`` (one cell's): 1 at 100% real without synthetic
    images, where every repeat trains on the one pool and differs by its seed only."""
    shared = (runs["real_fraction"] < 1.0) | (runs["synthetic"] != "none")
    return int(runs.loc[shared, "sample_index"].nunique() + (~shared).any())


def cluster_ids(runs: pd.DataFrame) -> np.ndarray:
    """The bootstrap cluster of each run: its sample index where repeats share samples.

    Repeats share randomness only where the real sample is a proper subset of the pool
    or a generator made part of the training set; at 100% real without synthetic
    images every repeat sees the same pool and is its own cluster.
    """
    shared = (runs["real_fraction"] < 1.0) | (runs["synthetic"] != "none")
    return np.where(shared, runs["sample_index"].astype(str),
                    "r" + runs["repeat"].astype(str)).astype(str)


def metric_values(runs: pd.DataFrame, metric: str) -> np.ndarray:
    """``runs[metric]`` as floats; a missing (diverged, NaN) loss counts as +inf.

    A run whose loss blew up is the worst outcome, not a missing one: dropping it would
    flatter its cell. The median is unmoved by a few infinities; only when half the runs
    of a cell diverge does its median become inf.
    """
    values = runs[metric].to_numpy(dtype=np.float64)
    return np.where(np.isnan(values), np.inf, values) if metric.endswith("_loss") else values


def cell_summary(runs: pd.DataFrame, metrics: Sequence[str] | None = None,
                 n_boot: int | None = None, level: float | None = None,
                 seed: int | None = None) -> pd.DataFrame:
    """One row per cell: runs, and for each metric its median with bootstrap interval.

    Columns: the cell columns, ``n``, ``samples`` (distinct real samples:
    :func:`sample_count`), ``clusters`` (the independent units the bootstrap resamples:
    real samples where repeats share them, single runs at 100% real without synthetic
    images; a cell run one generator at a time can hold one, and its interval then misses
    the variation between samples),
    ``init``, ``diverged`` (runs whose final validation loss is missing or infinite),
    and ``<metric>``, ``<metric>_low``, ``<metric>_high`` for each metric (default:
    final and best validation and test cross-entropy, test accuracy and macro-F1, and
    Moderate_Demented test recall).
    """
    runs = _with_metrics(runs)
    metrics = list(metrics or default_metrics(runs))
    missing = [m for m in metrics if m not in runs.columns]
    if missing:
        raise ValueError(f"metric(s) {missing} are not columns of the runs table; "
                         f"available: {sorted(runs.columns)}")
    rows = []
    columns = cell_columns(runs)
    for key, cell in runs.groupby(columns, sort=True, dropna=False):
        groups = cluster_ids(cell)
        row = dict(zip(columns, key), n=len(cell), samples=sample_count(cell),
                   clusters=len(np.unique(groups)), init=_init_of(cell))
        if "final_val_loss" in cell:
            row["diverged"] = int((~np.isfinite(metric_values(cell, "final_val_loss"))).sum())
        for metric in metrics:
            values = metric_values(cell, metric)
            if np.isnan(values).all():  # e.g. recall of a class the split does not hold
                row.update({metric: np.nan, f"{metric}_low": np.nan, f"{metric}_high": np.nan})
                continue
            iv = bootstrap_median(values, groups, n_boot, level, seed)
            row.update({metric: iv.estimate, f"{metric}_low": iv.low, f"{metric}_high": iv.high})
        rows.append(row)
    return pd.DataFrame(rows)


def default_metrics(runs: pd.DataFrame) -> list[str]:
    """The metrics the report shows, those of them that ``runs`` has."""
    wanted = ["best_test_loss", "best_test_accuracy", "best_test_balanced_accuracy",
              "best_test_macro_f1", "best_test_recall_Moderate_Demented", "final_val_loss"]
    return [m for m in wanted if m in runs.columns]


def _with_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    if any(c.endswith("_confusion") for c in runs.columns) and \
            not any(c.endswith("_macro_f1") for c in runs.columns):
        return with_confusion_metrics(runs)
    return runs


def _init_of(cell: pd.DataFrame) -> str:
    return ",".join(sorted(set(cell["init"].astype(str)))) if "init" in cell else "unknown"


def select_cell(runs: pd.DataFrame, **cell) -> pd.DataFrame:
    """The runs of one cell, e.g. ``select_cell(runs, model="basic_cnn", aug="none", ...)``.

    Cell columns left out match anything; ``leakage`` defaults to ``"none"`` for
    real-only cells and ``"sample"`` otherwise (the leak-free generator).
    """
    unknown = set(cell) - set(CELL_COLUMNS)
    if unknown:
        raise ValueError(f"unknown cell field(s) {sorted(unknown)}; use {CELL_COLUMNS}")
    if "leakage" not in cell and "synthetic" in cell:
        cell["leakage"] = "none" if cell["synthetic"] == "none" else "sample"
    mask = np.ones(len(runs), dtype=bool)
    for col, value in cell.items():
        if col == "real_fraction":
            mask &= np.isclose(runs[col].astype(float), float(value))
        else:
            mask &= (runs[col] == value).to_numpy()
    return runs[mask]


def compare_cells(runs: pd.DataFrame, a: dict, b: dict, metric: str | None = None,
                  n_boot: int | None = None, level: float | None = None,
                  seed: int | None = None) -> dict:
    """How much cell ``a`` exceeds cell ``b`` in ``metric``, with its interval.

    The cells are paired when they have the same real fraction and their repeats share
    sample seeds (repeat ``r`` of each used real sample ``r mod G``); only repeats
    present in both enter a paired comparison, whose ``difference`` is the median of the
    per-repeat differences (``estimand``; see the module docstring), and ``median_a``
    and ``median_b`` are those of the same repeats. Unpaired, ``difference`` is
    median(a) - median(b). A pair is clustered by its real sample when either cell's
    repeats share samples (:func:`cluster_ids`), so the result does not depend on which
    cell is ``a``. ``clusters`` counts the independent units the comparison rests on;
    below ``min_clusters`` it is never distinguishable.
    """
    cfg = settings(DEFAULTS, PRESETS)
    metric = metric or cfg["metric"]
    runs = _with_metrics(runs)
    ra, rb = select_cell(runs, **dict(a)), select_cell(runs, **dict(b))
    for name, sel, spec in (("a", ra, a), ("b", rb, b)):
        if sel.empty:
            raise ValueError(f"cell {name} = {spec} has no runs in the table; run it first "
                             f"(python -m mrilib grid) or fix the cell fields")
    paired = _paired(ra, rb)
    if paired:
        joined = ra.merge(rb, on="repeat", suffixes=("_a", "_b"))
        ra, rb = _side(joined, "_a"), _side(joined, "_b")
        groups = _pair_clusters(ra, rb)
        iv = bootstrap_median_difference(metric_values(ra, metric), metric_values(rb, metric),
                                         groups_a=groups, paired=True, n_boot=n_boot,
                                         level=level, seed=seed)
        n_a = n_b = len(joined)
        clusters = len(set(groups))
    else:
        iv = bootstrap_median_difference(metric_values(ra, metric), metric_values(rb, metric),
                                         cluster_ids(ra), cluster_ids(rb),
                                         paired=False, n_boot=n_boot, level=level, seed=seed)
        n_a, n_b = len(ra), len(rb)
        clusters = min(len(set(cluster_ids(ra))), len(set(cluster_ids(rb))))
    return {"metric": metric, "difference": iv.estimate, "low": iv.low, "high": iv.high,
            "paired": paired, "estimand": "median of paired differences" if paired
            else "difference of medians", "n_a": n_a, "n_b": n_b, "clusters": clusters,
            "median_a": float(np.median(metric_values(ra, metric))),
            "median_b": float(np.median(metric_values(rb, metric))),
            "distinguishable": iv.excludes_zero() and clusters >= cfg["min_clusters"]}


def _paired(ra: pd.DataFrame, rb: pd.DataFrame) -> bool:
    if "sample_seed" not in ra or not np.isclose(ra["real_fraction"].iloc[0],
                                                 rb["real_fraction"].iloc[0]):
        return False
    joined = ra.merge(rb, on="repeat", suffixes=("_a", "_b"))
    return len(joined) >= 2 and bool((joined["sample_seed_a"] == joined["sample_seed_b"]).all())


def _pair_clusters(ra: pd.DataFrame, rb: pd.DataFrame) -> np.ndarray:
    """The cluster of each pair: the shared sample where either side's repeats share it."""
    ga, gb = cluster_ids(ra), cluster_ids(rb)
    own = np.char.startswith(ga.astype(str), "r")  # a's repeat is its own cluster
    return np.where(own, gb, ga)


def _side(joined: pd.DataFrame, suffix: str) -> pd.DataFrame:
    cols = {c: c[: -len(suffix)] for c in joined.columns if c.endswith(suffix)}
    return joined[list(cols) + ["repeat"]].rename(columns=cols)


def synthetic_effects(runs: pd.DataFrame, metric: str | None = None,
                      n_boot: int | None = None, level: float | None = None,
                      seed: int | None = None) -> pd.DataFrame:
    """Did synthetic images help? Each synthetic cell against its real-only twin.

    The twin has the same model, augmentation and real fraction and no synthetic
    images, so the two share their real samples and the comparison is paired. A
    negative ``difference`` of a loss means the synthetic images lowered it.
    """
    rows = []
    synthetic = runs[runs["synthetic"] != "none"]
    keys = cell_columns(runs)
    for key, _ in synthetic.groupby(keys, sort=True):
        cell = dict(zip(keys, key))
        twin = {**{k: cell[k] for k in ("split", "model", "aug") if k in cell},
                "synthetic": "none", "real_fraction": cell["real_fraction"]}
        if select_cell(runs, **twin).empty:
            continue
        result = compare_cells(runs, cell, twin, metric, n_boot, level, seed)
        rows.append({**cell, **result})
    return pd.DataFrame(rows)

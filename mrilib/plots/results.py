"""Thesis chapter 7's figures: loss curves, the augmentation comparison, the sweep.

Every function takes the tables of :func:`mrilib.grid.load_results` (``runs``:
one row per training run; ``epochs``: one row per run and epoch) and returns a Figure;
``save=NAME`` also writes it with :func:`mrilib.plots.save_figure`. Intervals are
percentile-bootstrap 95% intervals of the median over repeats (:mod:`mrilib.stats`); a
figure that shows a table's numbers takes them from :mod:`mrilib.report.tables`.

A figure whose cells are not in the results yet (the quick grid, a GPU run cut short)
raises :class:`MissingCells` naming them; :func:`if_available` turns that into a
printed note, so a notebook or the report over a partial grid draws what it can.

Two labels are never left out: ResNet-18 and the ViT say "from scratch" when their
runs started from random weights (``init == "scratch"``, the thesis fine-tuned ImageNet
weights), and every figure names its split (a slice-level split's numbers are
optimistic). A figure draws runs of one split: give it ``runs[runs["split"] == ...]``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import stats

SPLIT_NOTES = {
    "slice": "Slice-level split (the thesis's): slices of one brain fall on both sides, so "
             "losses and accuracies are optimistic, the more so the more real slices train.",
    "subject": "Subject-level split: every brain on one side; test scores are of unseen brains.",
}
AUG_LABELS = {"none": "No augmentation", "hflip": "Random horizontal flip",
              "autoaugment": "AutoAugment"}
PRIMARY = "best_test_loss"  # the primary measure: test cross-entropy at the selected epoch
METRIC_LABELS = {
    "best_test_loss": "test cross-entropy (epoch selected on validation)",
    "final_val_loss": "validation cross-entropy (last epoch; the thesis's measure)",
    "final_test_loss": "test cross-entropy (last epoch)",
}
# Figure 7.1's three training sets.
CURVE_CELLS = (("fill", 0.3, "30% real + 70% synthetic"), ("none", 0.3, "30% real"),
               ("none", 1.0, "100% real"))


class MissingCells(ValueError):
    """The cells a figure or table needs are not in the results yet (a partial grid)."""


def if_available(make: Callable, *args, **kwargs):
    """``make(*args, **kwargs)``, or None with a printed note when its cells are not run yet.

    For notebooks and the report over a partial grid (the quick grid, a GPU run cut
    short): what can be drawn is drawn, and what cannot says which cells it waits for.
    """
    try:
        return make(*args, **kwargs)
    except MissingCells as err:
        print(f"not shown: {err}")
        return None


def _fraction_axis(ax) -> None:
    """Real fractions 30%..100% on the x axis, the same on every panel."""
    from ..grid import FRACTIONS

    ax.set_xlim(FRACTIONS[0] - 0.05, FRACTIONS[-1] + 0.05)
    ax.set_xticks(FRACTIONS, [f"{x:.0%}" for x in FRACTIONS])
    ax.set_xlabel("real fraction of the training pool")
    ax.grid(alpha=0.3)


def _maybe_save(fig, save):
    if save:
        from . import save_figure
        save_figure(fig, save)
    return fig


def model_label(runs: pd.DataFrame, model: str) -> str:
    """``"Basic CNN"``, ``"ResNet-18 (from scratch)"``, ``"ViT-Tiny/16 (ImageNet)"``..."""
    from ..models import MODELS

    label = MODELS[model].label if model in MODELS else model
    if model == "basic_cnn":
        return label  # always trained from scratch, as in the thesis
    inits = (set(runs.loc[runs["model"] == model, "init"].astype(str))
             if "init" in runs.columns else set())
    names = {"scratch": "from scratch", "imagenet": "ImageNet"}
    return f"{label} ({' + '.join(names.get(i, i) for i in sorted(inits)) or 'init unknown'})"


def split_of(frame: pd.DataFrame) -> str:
    """The one split of ``frame``'s runs (rows without one are the slice split's)."""
    splits = set(frame["split"].dropna()) if "split" in frame else set()
    if len(splits) > 1:
        raise ValueError(f"these runs hold the {' and '.join(sorted(splits))} splits, which "
                         f"are two protocols: draw one at a time, e.g. "
                         f"runs[runs['split'] == 'subject']")
    return next(iter(splits), "slice")


def _note(fig, extra: str = "", note: str | None = None, split: str = "slice") -> None:
    """The split caveat under every figure; ``note`` (e.g. quick-preset numbers) in red below.

    Wrapped here, not by matplotlib, so the red line starts below the last grey one.
    """
    import textwrap

    from . import stamp

    if note is None:  # results of the full protocol: nothing a reduced preset made
        stamp(fig, None)
    width_in, height_in = fig.get_size_inches()
    y = -0.01
    for text, size, color in (((extra + " " if extra else "") + SPLIT_NOTES[split], 7, "0.3"),
                              (note, 8, "firebrick")):
        if not text:
            continue
        lines = textwrap.wrap(text, width=int(width_in * 144 / size))  # ~0.5 em per char
        fig.text(0.01, y, "\n".join(lines), fontsize=size, ha="left", va="top", color=color)
        y -= len(lines) * 1.35 * size / 72 / height_in


def metric_label(metric: str) -> str:
    """``"validation cross-entropy (last epoch)"``...; the column name for another metric."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


# ----------------------------------------------------------------------------- Figure 7.1

def loss_curves_figure(epochs: pd.DataFrame, model: str = "basic_cnn", aug: str = "none",
                       band: tuple[float, float] = (0.25, 0.75), save: str | None = None,
                       note: str | None = None):
    """Figure 7.1: training and validation loss per epoch, median and band over repeats.

    30% real + 70% synthetic against 30% and 100% real; the band spans the ``band``
    quantiles of the repeats at each epoch. A cell's curve ends at the last epoch all its
    repeats trained (its label says so when early stopping cut it).
    """
    split = split_of(epochs)  # one protocol per figure
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    shown = 0
    few = epochs["epoch"].nunique() <= 12 if "epoch" in epochs else True  # dots show each epoch
    for (synthetic, fraction, label), color in zip(CURVE_CELLS, ("C3", "C0", "C2")):
        curves = stats.select_cell(epochs, model=model, aug=aug, synthetic=synthetic,
                                   real_fraction=fraction)
        if curves.empty:
            continue
        shown += 1
        n = curves["repeat"].nunique()
        # Up to the last epoch every repeat trained: past it, early-stopped (overfitting)
        # repeats would drop out of the median and flatter the ones still improving.
        reached = int(curves.groupby("repeat")["epoch"].max().min())
        cut = reached < int(curves["epoch"].max())
        curves = curves[curves["epoch"] <= reached]
        for ax, column in zip(axes, ("train_loss", "val_loss")):
            q = curves.groupby("epoch")[column].quantile([band[0], 0.5, band[1]]).unstack()
            ax.plot(q.index, q[0.5], color=color, marker="o" if few else None, ms=4,
                    label=f"{label} (n={n}" + (f", to epoch {reached}, the last all trained)"
                                               if cut else ")"))
            if len(q) > 1:
                ax.fill_between(q.index, q[band[0]], q[band[1]], color=color, alpha=0.2)
            else:  # one epoch: a band has no width, draw it as a bar
                ax.vlines(q.index, q[band[0]], q[band[1]], color=color, alpha=0.4, lw=6)
    if not shown:
        plt.close(fig)
        raise MissingCells(f"loss_curves_figure: no epoch rows for {model}/{aug} at 30% or "
                           f"100% real yet; run those cells first")
    last = int(epochs["epoch"].max())
    for ax, title in zip(axes, ("Training loss", "Validation loss")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last + 0.5)
        if few:
            ax.set_xticks(range(1, last + 1))
        else:
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Figure 7.1 - {model_label(epochs, model)}, {AUG_LABELS[aug].lower()}: median and "
                 f"{band[0]:.0%}-{band[1]:.0%} band over repeats")
    fig.tight_layout()
    _note(fig, note=note, split=split)
    return _maybe_save(fig, save)


# ----------------------------------------------------------------------------- Figure 7.2

def augmentation_figure(runs: pd.DataFrame, model: str = "basic_cnn", real_fraction: float = 0.3,
                        metric: str = PRIMARY, save: str | None = None,
                        note: str | None = None):
    """Figure 7.2: the distribution of the loss over repeats for each augmentation policy.

    At ``real_fraction`` real images, without and with synthetic images (fill), so the
    thesis's claim that synthetic images beat classical augmentation can be read off.
    """
    split = split_of(runs)  # one protocol per figure
    at = stats.select_cell(runs, model=model, real_fraction=real_fraction)
    at = at[at["leakage"].isin(["none", "sample"])]
    if at.empty:
        raise MissingCells(f"augmentation_figure: no runs for {model} at {real_fraction:.0%} "
                           f"real yet")
    fig, ax = plt.subplots(figsize=(8, 4))
    positions, labels, data, colors = [], [], [], []
    for i, aug in enumerate(a for a in AUG_LABELS if a in set(at["aug"])):
        for j, synthetic in enumerate(("none", "fill")):
            values = stats.metric_values(at[(at["aug"] == aug) & (at["synthetic"] == synthetic)],
                                         metric)
            if not len(values):
                continue
            diverged = int((~np.isfinite(values)).sum())
            positions.append(i * 3 + j)
            data.append(values[np.isfinite(values)])
            colors.append("C3" if synthetic == "fill" else "C0")
            labels.append(f"{AUG_LABELS[aug]}\n{'+ synthetic' if synthetic == 'fill' else 'real only'}"
                          + (f"\n({diverged} diverged)" if diverged else ""))
    box = ax.boxplot(data, positions=positions, widths=0.7, patch_artist=True, showfliers=False)
    for patch, color in zip(box["boxes"], colors):
        patch.set_facecolor(color)
        patch.set_alpha(0.35)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is the same each time
    for pos, values in zip(positions, data):
        ax.scatter(pos + rng.uniform(-0.15, 0.15, len(values)), values, s=10, color="0.2")
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set_ylabel(metric_label(metric))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Figure 7.2 - {model_label(runs, model)}, {real_fraction:.0%} real: "
                 f"loss over repeats by augmentation policy")
    fig.tight_layout()
    _note(fig, "Boxes: quartiles and median; dots: single runs.", note, split)
    return _maybe_save(fig, save)


# ----------------------------------------------------------------------------- beside the thesis

def thesis_comparison_figure(runs: pd.DataFrame, metric: str = "final_val_loss",
                             n_boot: int | None = None, seed: int | None = None,
                             save: str | None = None, note: str | None = None):
    """Our medians with intervals beside the thesis's numbers (basic CNN, no augmentation);
    hollow where a cell rests on fewer than ``min_clusters`` real samples."""
    split = split_of(runs)  # one protocol per figure
    from ..report.tables import min_clusters, thesis_comparison, thesis_metric

    metric = thesis_metric(metric)
    table = thesis_comparison(runs, metric, n_boot, seed)
    if not table["n"].any():
        raise MissingCells("thesis_comparison_figure: none of the thesis's three basic-CNN "
                           "cells (30%, 100% real, 30% + 70% synthetic) has runs yet")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    y = np.arange(len(table))
    ours = table["ours"].to_numpy()
    err = np.vstack([ours - table["low"].to_numpy(), table["high"].to_numpy() - ours])
    few = table["units"].to_numpy() < min_clusters()
    for mask, face, label in ((~few, "C0", "ours: median, 95% interval"),
                              (few, "none", f"ours, fewer than {min_clusters()} real samples")):
        if mask.any():
            ax.errorbar(ours[mask], y[mask], xerr=err[:, mask], fmt="o", color="C0",
                        markerfacecolor=face, capsize=4, label=label)
    ax.scatter(table["thesis"], y, marker="D", color="C3", zorder=3, label="Kwon (2024)")
    ax.set_yticks(y, table.index)
    ax.invert_yaxis()
    ax.set_xlabel(f"median {metric_label(metric)}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("Basic CNN, no augmentation: the thesis's numbers and ours")
    fig.tight_layout()
    _note(fig, note=note, split=split)
    return _maybe_save(fig, save)


# ----------------------------------------------------------------------------- the sweep

def _with_gaps(line: pd.DataFrame, synthetic: str) -> pd.DataFrame:
    """``line`` with a NaN row at each grid fraction between its ends that was not run,
    so the sweep's line breaks there instead of joining its neighbours."""
    from ..grid import FRACTIONS

    have = line["real_fraction"].round(4)
    grid = [x for x in FRACTIONS if have.min() < x < have.max() and not (have == x).any()
            and (synthetic == "none" or x < 1)]
    if not grid:
        return line
    gaps = pd.DataFrame({"real_fraction": grid})
    return pd.concat([line, gaps], ignore_index=True).sort_values("real_fraction")


def fraction_sweep_figure(runs: pd.DataFrame, aug: str = "none", metric: str = PRIMARY,
                          models: Sequence[str] | None = None, n_boot: int | None = None,
                          seed: int | None = None, save: str | None = None,
                          note: str | None = None):
    """Loss against real fraction, without and with synthetic top-up, one panel per model.

    Points are medians over repeats with 95% intervals; the basic-CNN panel also shows
    the thesis's three numbers.
    """
    split = split_of(runs)  # one protocol per figure
    from ..report.tables import THESIS_NUMBERS

    drawn = runs[(runs["aug"] == aug) & runs["leakage"].isin(["none", "sample"])
                 & runs["synthetic"].isin(["none", "fill"])]
    models = [m for m in (models or ("basic_cnn", "resnet18", "vit_tiny"))
              if (drawn["model"] == m).any()]
    if not models:
        raise MissingCells(f"fraction_sweep_figure: no real-only or topped-up runs with "
                           f"aug={aug!r} yet")
    fig, axes = plt.subplots(1, len(models), figsize=(max(4.6 * len(models), 6.4), 3.8),
                             squeeze=False)
    summary = stats.cell_summary(drawn, metrics=[metric], n_boot=n_boot, seed=seed)
    for ax, model in zip(axes[0], models):
        for synthetic, label, color, shift in (("none", "real only", "C0", -0.006),
                                               ("fill", "real + synthetic to 100%", "C3", 0.006)):
            line = summary[(summary["model"] == model) & (summary["synthetic"] == synthetic)]
            if line.empty:
                continue
            line = _with_gaps(line.sort_values("real_fraction"), synthetic)
            x = line["real_fraction"].to_numpy() + shift
            err = np.vstack([line[metric] - line[f"{metric}_low"], line[f"{metric}_high"] - line[metric]])
            ax.errorbar(x, line[metric], yerr=err, fmt="o-", color=color, capsize=3, label=label)
        if model == "basic_cnn" and aug == "none":
            for synthetic, color in (("none", "C0"), ("fill", "C3")):
                ref = THESIS_NUMBERS[THESIS_NUMBERS["synthetic"] == synthetic]
                ax.scatter(ref["real_fraction"], ref["thesis"], marker="D", facecolor="none",
                           edgecolor=color, zorder=3, s=40,
                           label=f"Kwon (2024), {'real only' if synthetic == 'none' else '+ synthetic'}")
        ax.set_title(model_label(runs, model))
        _fraction_axis(ax)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel(f"median {metric_label(metric)}")
    fig.suptitle(f"Loss against real fraction ({AUG_LABELS[aug].lower()}), median and 95% interval")
    fig.tight_layout()
    _note(fig, note=note, split=split)
    return _maybe_save(fig, save)


def synthetic_effect_figure(runs: pd.DataFrame, aug: str = "none", metric: str = PRIMARY,
                            n_boot: int | None = None, seed: int | None = None,
                            save: str | None = None, note: str | None = None):
    """Did synthetic images help? Paired median differences (synthetic - real only), per model.

    Below zero the synthetic images lowered the loss; an interval that crosses zero is
    not distinguishable from noise.
    """
    split = split_of(runs)  # one protocol per figure
    from ..report.tables import leak_free_effects

    effects = leak_free_effects(runs[runs["aug"] == aug], metric, n_boot, seed)
    if effects.empty:
        raise MissingCells(f"synthetic_effect_figure: no synthetic cell with a real-only "
                           f"twin for aug={aug!r} yet")
    models = list(dict.fromkeys(effects["model"]))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, model in enumerate(models):
        for synthetic, marker in (("fill", "o"), ("100+20mod", "s")):
            part = effects[(effects["model"] == model) & (effects["synthetic"] == synthetic)]
            if part.empty:
                continue
            part = part.sort_values("real_fraction")
            x = part["real_fraction"].to_numpy() + 0.01 * (i - (len(models) - 1) / 2)
            err = np.vstack([part["difference"] - part["low"], part["high"] - part["difference"]])
            label = model_label(runs, model) + ("" if synthetic == "fill" else ", +20% Moderate only")
            ax.errorbar(x, part["difference"], yerr=err, fmt=marker, color=f"C{i}", capsize=3,
                        label=label)
    ax.axhline(0, color="k", lw=0.8)
    _fraction_axis(ax)
    ax.set_ylabel(f"median difference in\n{metric_label(metric)}")
    ax.set_title(f"Synthetic minus real only ({AUG_LABELS[aug].lower()}): paired, 95% intervals")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _note(fig, "Below 0: the synthetic images lowered the loss.", note, split)
    return _maybe_save(fig, save)


# ----------------------------------------------------------------------------- leakage

def leakage_figure(runs: pd.DataFrame, metric: str = PRIMARY, n_boot: int | None = None,
                   seed: int | None = None, save: str | None = None, note: str | None = None):
    """The leakage ablation: real only, leak-free and leaky generator, median and interval."""
    split = split_of(runs)  # one protocol per figure
    from ..report.tables import cell_interval

    keys = runs[runs["leakage"] == "leaky"].drop_duplicates(["model", "aug", "real_fraction"])
    if keys.empty:
        raise MissingCells("leakage_figure: no leaky-generator runs in the results yet")
    fig, ax = plt.subplots(figsize=(10, 1.8 + 1.1 * len(keys)))
    specs = (("real only", {"synthetic": "none"}, "C0"),
             ("leak-free generator", {"synthetic": "fill", "leakage": "sample"}, "C3"),
             ("leaky generator (trained on the whole pool)",
              {"synthetic": "fill", "leakage": "leaky"}, "C1"))
    ticks = []
    for i, (_, key) in enumerate(keys.iterrows()):
        cell = {"model": key["model"], "aug": key["aug"], "real_fraction": key["real_fraction"]}
        ticks.append(f"{model_label(runs, key['model'])}\n{key['real_fraction']:.0%} real, "
                     f"{AUG_LABELS[key['aug']].lower()}")
        for j, (label, spec, color) in enumerate(specs):
            found = cell_interval(runs, metric, n_boot, seed, **cell, **spec)
            if found is None:
                continue
            est, low, high, _ = found
            ax.errorbar(est, i + 0.22 * (j - 1), xerr=[[est - low], [high - est]], fmt="o",
                        color=color, capsize=3, label=label if i == 0 else None)
    ax.set_yticks(range(len(ticks)), ticks, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"median {metric_label(metric)}")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Leakage ablation: does a generator that saw the whole pool flatter the result?")
    fig.tight_layout()
    _note(fig, note=note, split=split)
    return _maybe_save(fig, save)

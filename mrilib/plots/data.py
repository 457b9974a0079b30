"""Chapter 1 / thesis chapter 2: what the dataset holds."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

SPLIT_ORDER = ("train", "val", "test")


def _maybe_save(fig, save):
    if save:
        from . import save_figure
        save_figure(fig, save)
    return fig


def class_counts_table(counts_by_split: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Images per class (rows) and split (columns), with totals: the thesis's Table 2.1."""
    table = pd.DataFrame(counts_by_split).loc[:, [s for s in SPLIT_ORDER if s in counts_by_split]]
    table["all"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def class_counts_figure(counts_by_split: dict[str, dict[str, int]], save: str | None = None):
    """Bar plot of images per class in each split (log scale: Moderate has 64 images in all)."""
    long = (pd.DataFrame(counts_by_split).rename_axis("class").reset_index()
            .melt(id_vars="class", var_name="split", value_name="images"))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.barplot(data=long, x="class", y="images", hue="split", ax=ax)
    ax.set_yscale("log")
    ax.set_title("Images per class and split (log scale)")
    for container in ax.containers:
        ax.bar_label(container, fontsize=7)
    ax.set_xlabel("")
    fig.tight_layout()
    return _maybe_save(fig, save)


def example_grid_figure(data, per_class: int = 4, seed: int = 0, save: str | None = None):
    """Random example slices, one row per class (thesis Figure 2.1)."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(data.classes), per_class,
                             figsize=(1.6 * per_class, 1.7 * len(data.classes)))
    for c, name in enumerate(data.classes):
        members = torch.nonzero(data.labels == c).flatten().numpy()
        for j, i in enumerate(rng.choice(members, size=min(per_class, len(members)), replace=False)):
            axes[c, j].imshow(data.images[i, 0].numpy(), cmap="gray", vmin=0, vmax=255)
        for ax in axes[c]:
            ax.set_xticks([]), ax.set_yticks([])
        axes[c, 0].set_ylabel(name.replace("_", " "), fontsize=8)
    fig.suptitle(f"Example slices per class (random, seed {seed})")
    fig.tight_layout()
    return _maybe_save(fig, save)


def intensity_histogram_figure(data, save: str | None = None):
    """Per-class distribution of brain-pixel intensities (background 0 left out)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    bins = np.arange(1, 257)
    for c, name in enumerate(data.classes):
        pixels = data.images[data.labels == c].flatten()
        hist = torch.bincount(pixels.long(), minlength=256)[1:].double()
        ax.plot(bins[:-1], (hist / hist.sum()).numpy(), label=f"{name} (n={int((data.labels == c).sum())})")
    ax.set_xlabel("gray level (0 = background, left out)")
    ax.set_ylabel("share of brain pixels")
    ax.set_title("Intensity distribution per class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _maybe_save(fig, save)


def subject_table(data, recovery) -> pd.DataFrame:
    """Recovered brains and slices per class beside OASIS-1's subjects of that rating."""
    from ..subjects import OASIS1_SUBJECTS

    table = pd.DataFrame({
        "brains recovered": recovery.by_class(data.classes),
        "slices": data.counts(),
        "OASIS-1 rating": {c: OASIS1_SUBJECTS.get(c, ("?", None))[0] for c in data.classes},
        "OASIS-1 subjects": {c: OASIS1_SUBJECTS.get(c, ("?", None))[1] for c in data.classes},
    })
    table["slices per brain"] = table["slices"] / table["brains recovered"]
    return table


def nearest_neighbour_figure(data, report: dict, save: str | None = None):
    """Nearest-neighbour distances (within train, held-out to train) and the closest pairs."""
    pairs = report["closest_pairs"][:4]
    fig = plt.figure(figsize=(10, 4.2))
    grid = fig.add_gridspec(2, 1 + len(pairs), width_ratios=[3] + [1] * len(pairs))
    ax = fig.add_subplot(grid[:, 0])
    for key, label in (("nn_within_train", "train to nearest other train"),
                       ("nn_heldout_to_train", "val/test to nearest train")):
        ax.hist(report[key].numpy(), bins=60, alpha=0.6, label=label, density=True)
    ax.axvline(report["threshold"], color="k", ls="--", lw=1, label="near-duplicate threshold")
    ax.set_xlabel("RMS distance on 32x32 thumbnails (gray levels)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title("How close is the nearest other slice?")
    for j, (held, train, dist) in enumerate(pairs):
        for row, idx in enumerate((held, train)):
            a = fig.add_subplot(grid[row, 1 + j])
            a.imshow(data.images[idx, 0].numpy(), cmap="gray", vmin=0, vmax=255)
            a.set_xticks([]), a.set_yticks([])
            a.set_title(("held-out" if row == 0 else "train") + (f"\nd={dist:.1f}" if row == 0 else ""),
                        fontsize=7)
    fig.tight_layout()
    return _maybe_save(fig, save)


def subject_slices_figure(data, subject: int, groups=None, save: str | None = None):
    """Every slice of one recovered subject, in stack order (see
    :func:`mrilib.subjects.slice_order`); ``groups`` defaults to ``data.subjects``."""
    from ..subjects import slice_order

    groups = data.subjects if groups is None else groups
    members = torch.nonzero(groups == subject).flatten()
    if len(members) == 0:
        raise ValueError(f"subject {subject} has no images; give one of 0..{int(groups.max())}")
    members = members[slice_order(data.images[members])]
    cols = 8
    rows = -(-len(members) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.35 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, members.tolist()):
        ax.imshow(data.images[i, 0].numpy(), cmap="gray", vmin=0, vmax=255)
    name = data.classes[int(data.labels[members[0]])].replace("_", " ")
    fig.suptitle(f"Subject {subject}: {len(members)} slices recovered as one brain ({name})")
    fig.tight_layout()
    return _maybe_save(fig, save)

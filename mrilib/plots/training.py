"""Thesis chapter 7, one cell at a time: its training set, live loss curves, its runs.

:class:`LiveLossPlot` is an ``on_epoch`` callback for
:func:`mrilib.train.train_replicates`: it redraws the training and validation loss of
every replicate as each epoch arrives, in place in a notebook (IPython's
``display_id``), and draws nothing elsewhere (scripts, the CLI, tests), where it still
keeps the figure up to date for saving.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .data import _maybe_save
from .results import SPLIT_NOTES

# Legend entries beyond this many replicates would hide the curves (and colours repeat).
MAX_LEGEND = 10


def _notebook_display():
    """IPython's ``display`` when running in a notebook kernel, else None."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return None
    shell = get_ipython()
    return display if getattr(shell, "kernel", None) is not None else None


class LiveLossPlot:
    """Training and validation loss per replicate, redrawn as epochs arrive.

    Pass the object as ``on_epoch`` to :func:`mrilib.train.train_replicates` (or call it
    with the same dicts). The figure is a plain ``matplotlib.figure.Figure``, not a
    pyplot one, so a notebook shows it once, in place, and not again at the end of the
    cell. ``fig`` holds it; with ``save=NAME`` it is written with
    :func:`mrilib.plots.save_figure` each time a vmap group finishes (``last``), so
    the file always shows every finished replicate. The ring on a validation curve marks
    the replicate's best epoch (lowest validation loss, the ``best`` of its record).
    """

    def __init__(self, title: str = "Training", note: str | None = None,
                 save: str | None = None, split: str = "slice"):
        self.title, self.save = title, save
        self.history: dict[int, dict[str, list]] = {}  # replicate -> epoch, train, val lists
        self.seeds: dict[int, int] = {}
        self.epochs: int | None = None
        self.fig = Figure(figsize=(10, 3.8))
        self.axes = self.fig.subplots(1, 2, sharey=True)
        _notes(self.fig, note, split)
        self._display = _notebook_display()
        self._handle = None

    def __call__(self, update: dict) -> None:
        """Record one epoch of one vmap group (the dict ``on_epoch`` receives) and redraw."""
        self.epochs = update["epochs"]
        for j, (rep, seed) in enumerate(zip(update["replicates"], update["seeds"])):
            row = self.history.setdefault(rep, {"epoch": [], "train_loss": [], "val_loss": []})
            self.seeds[rep] = seed
            row["epoch"].append(update["epoch"])
            for key in ("train_loss", "val_loss"):
                row[key].append(update[key][j])
        self.redraw()
        if self._display is not None:
            if self._handle is None:
                self._handle = self._display(self.fig, display_id=True)
            else:
                self._handle.update(self.fig)
        if self.save and update["last"]:
            from . import save_figure
            save_figure(self.fig, self.save)

    def redraw(self) -> Figure:
        """Draw every replicate's curves so far; the Figure."""
        for ax, key, title in zip(self.axes, ("train_loss", "val_loss"),
                                  ("Training loss (mean over the epoch)",
                                   "Validation loss (end of epoch)")):
            ax.clear()
            for rep, row in sorted(self.history.items()):
                color = f"C{rep % 10}"  # fixed per replicate, whatever arrives later
                ax.plot(row["epoch"], row[key], "o-", ms=3, color=color,
                        label=f"replicate {rep} (seed {self.seeds[rep]})")
                if key == "val_loss":
                    best = int(np.argmin(row[key]))
                    ax.plot(row["epoch"][best], row[key][best], "o", ms=8, mfc="none", color=color)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if self.epochs:
                ax.set_xlim(0.5, self.epochs + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
        self.axes[0].set_ylabel("cross-entropy")
        if 0 < len(self.history) <= MAX_LEGEND:
            self.axes[1].legend(fontsize=7, loc="upper right")
        self.fig.suptitle(f"{self.title}: {len(self.history)} replicate(s), "
                          f"ring = best epoch by validation loss")
        self.fig.tight_layout()
        return self.fig


def _notes(fig, note: str | None, split: str | None = "slice") -> None:
    """Under the figure: the split's caveat, and ``note`` (e.g. quick preset) in red."""
    if split:
        fig.text(0.01, -0.01, SPLIT_NOTES[split], fontsize=7, ha="left", va="top", wrap=True,
                 color="0.3")
    if note:
        fig.text(0.01, -0.07 if split else -0.01, note, fontsize=8, ha="left", va="top",
                 wrap=True, color="firebrick")


def training_set_figure(sets, classes: Sequence[str], repeat: int = 0, per_class: int = 3,
                        seed: int = 0, note: str | None = None, save: str | None = None):
    """Random real and synthetic images of one repeat's training set, one row per class.

    ``sets`` is a :class:`mrilib.grid.TrainingSets`; row ``repeat`` of its index
    lists the repeat's real images first (``info[repeat]["n_real"]`` of them), then its
    synthetic ones. A class with no synthetic images shows empty panels there.
    """
    import matplotlib.pyplot as plt

    rows = sets.index[repeat]
    n_real = sets.info[repeat]["n_real"]
    parts = (("real", rows[:n_real]), ("synthetic", rows[n_real:]))
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(classes), 2 * per_class, squeeze=False,
                             figsize=(1.5 * 2 * per_class, 1.6 * len(classes)))
    for c, name in enumerate(classes):
        for p, (kind, part) in enumerate(parts):
            members = part[sets.bank_labels[part] == c].numpy()
            picked = rng.choice(members, size=min(per_class, len(members)), replace=False)
            for j in range(per_class):
                ax = axes[c, p * per_class + j]
                ax.set_xticks([]), ax.set_yticks([])
                if j < len(picked):
                    ax.imshow(sets.bank_images[picked[j], 0].numpy(), cmap="gray", vmin=0, vmax=255)
                if c == 0:
                    ax.set_title(kind, fontsize=8, color="C0" if kind == "real" else "C3")
        axes[c, 0].set_ylabel(name.replace("_", " "), fontsize=8)
    fig.suptitle(f"Training set of repeat {repeat}: real (left) and synthetic (right)")
    fig.tight_layout()
    _notes(fig, note, split=None)
    return _maybe_save(fig, save)


def replicates_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: seeds, and validation and test loss and accuracy, last and best epoch.

    ``runs`` has the columns of :func:`mrilib.grid.run_row` (the grid's runs table).
    "best" is the epoch of lowest validation loss; its test numbers are reported, never
    used to choose it.
    """
    columns = {"repeat": "repeat", "sample_index": "sample g", "train_seed": "train seed",
               "final_val_loss": "val loss (last)", "final_val_acc": "val acc (last)",
               "final_test_loss": "test loss (last)", "final_test_acc": "test acc (last)",
               "best_epoch": "best epoch", "best_val_loss": "val loss (best)",
               "best_test_loss": "test loss (best)", "best_test_acc": "test acc (best)"}
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise ValueError(f"replicates_table: the runs table lacks {missing}; build it with "
                         f"mrilib.grid.run_row or load_results")
    return runs[list(columns)].rename(columns=columns).set_index("repeat").sort_index()

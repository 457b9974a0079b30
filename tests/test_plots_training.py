"""Chapter 7, one cell: the live loss plot, the training-set figure and the replicates table."""
from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")  # headless, as in CI

from mrilib import paths  # noqa: E402
from mrilib.plots import training  # noqa: E402

EPOCHS = 3
# Two vmap groups, replicates [0, 1] then [2], as train_replicates reports them.
TRAIN = {0: [1.3, 1.0, 0.8], 1: [1.4, 1.1, 0.9], 2: [1.2, 0.9, 0.7]}
VAL = {0: [1.2, 0.9, 1.0], 1: [1.3, 1.2, 1.1], 2: [1.1, 1.05, 1.08]}


def updates():
    for group in ([0, 1], [2]):
        for e in range(EPOCHS):
            yield {"epoch": e + 1, "epochs": EPOCHS, "last": e + 1 == EPOCHS, "replicates": group,
                   "seeds": [100 + r for r in group], "train_loss": [TRAIN[r][e] for r in group],
                   "val_loss": [VAL[r][e] for r in group], "val_acc": [0.5 for _ in group]}


@pytest.fixture
def figures(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE", tmp_path)
    return paths.figures_dir()


def test_live_plot_draws_every_replicate_and_marks_its_best_epoch(figures):
    live = training.LiveLossPlot(title="test cell", note="quick preset", save="live")
    assert live._display is None  # not in a notebook kernel: nothing shown
    for update in updates():
        live(update)
    train_ax, val_ax = live.axes
    curves = [line for line in train_ax.get_lines()]
    assert [list(line.get_ydata()) for line in curves] == [TRAIN[r] for r in (0, 1, 2)]
    val_lines = val_ax.get_lines()
    assert len(val_lines) == 6  # a curve and a best-epoch ring per replicate
    for r, (curve, ring) in enumerate(zip(val_lines[::2], val_lines[1::2])):
        assert list(curve.get_ydata()) == VAL[r]
        best = int(np.argmin(VAL[r]))
        assert (list(ring.get_xdata()), list(ring.get_ydata())) == ([best + 1], [VAL[r][best]])
    assert [t.get_text() for t in val_ax.get_legend().get_texts()] == [
        f"replicate {r} (seed {100 + r})" for r in (0, 1, 2)]
    assert train_ax.get_xlim() == (0.5, EPOCHS + 0.5)
    assert "3 replicate(s)" in live.fig._suptitle.get_text()
    assert (figures / "live.png").stat().st_size > 0


def test_live_plot_saves_only_when_a_group_finishes(figures):
    live = training.LiveLossPlot(save="live")
    stream = list(updates())
    for update in stream[:EPOCHS - 1]:
        live(update)
    assert not (figures / "live.png").exists()
    live(stream[EPOCHS - 1])
    assert (figures / "live.png").exists()


def test_live_plot_shows_once_then_updates_in_a_notebook(monkeypatch):
    shown = []

    class Handle:
        def update(self, fig):
            shown.append(("update", fig))

    def display(fig, display_id):
        shown.append(("display", fig))
        return Handle()

    monkeypatch.setattr(training, "_notebook_display", lambda: display)
    live = training.LiveLossPlot()
    for update in updates():
        live(update)
    assert [kind for kind, _ in shown] == ["display"] + ["update"] * (2 * EPOCHS - 1)
    assert all(fig is live.fig for _, fig in shown)


def fake_sets(n_real=8, n_synthetic=12):
    """A TrainingSets-like bank: one repeat, real rows first, no Moderate synthetic images."""
    labels = torch.cat([torch.arange(n_real) % 4, torch.tensor([0, 2, 3] * (n_synthetic // 3))])
    images = torch.randint(0, 256, (len(labels), 1, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(bank_images=images, bank_labels=labels,
                           index=torch.arange(len(labels))[None], info=[{"n_real": n_real}])


def test_training_set_figure_shows_real_then_synthetic_per_class(figures):
    classes = ("Mild", "Moderate", "Non", "Very_Mild")
    fig = training.training_set_figure(fake_sets(), classes, per_class=2, save="set")
    axes = np.array(fig.axes).reshape(4, 4)
    assert [ax.get_title() for ax in axes[0]] == ["real"] * 2 + ["synthetic"] * 2
    shown = np.array([[len(ax.get_images()) for ax in row] for row in axes])
    assert shown.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert (figures / "set.png").exists()


def test_replicates_table_and_its_error():
    runs = pd.DataFrame([{"repeat": r, "sample_index": r % 2, "train_seed": 1000 + r,
                          "final_val_loss": 0.5, "final_val_acc": 0.8, "final_test_loss": 0.6,
                          "final_test_acc": 0.7, "best_epoch": 2, "best_val_loss": 0.4,
                          "best_test_loss": 0.5, "best_test_acc": 0.75, "other": 1}
                         for r in (1, 0)])
    table = training.replicates_table(runs)
    assert table.index.tolist() == [0, 1]
    assert table.loc[1, "train seed"] == 1001 and "other" not in table.columns
    with pytest.raises(ValueError, match="lacks \\['best_epoch'\\]"):
        training.replicates_table(runs.drop(columns="best_epoch"))


def test_live_plot_leaves_the_legend_out_for_many_replicates():
    live = training.LiveLossPlot()
    n = training.MAX_LEGEND + 2
    live({"epoch": 1, "epochs": 1, "last": True, "replicates": list(range(n)),
          "seeds": list(range(n)),
          "train_loss": [1.0] * n, "val_loss": [1.0] * n, "val_acc": [0.5] * n})
    assert live.axes[1].get_legend() is None and len(live.axes[0].get_lines()) == n


# ----------------------------------------------------------------------------- the preset stamp

def _bare_figure():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [1, 0])
    return fig


def _own_red_note(fig):
    fig.text(0.01, -0.01, "quick preset: this figure's own note", color="firebrick")
    return fig


def _shows_the_full_run(fig):
    from mrilib.plots import stamp

    return stamp(fig, None)  # e.g. the committed results, drawn under the quick preset


@pytest.mark.parametrize("preset, make, stamp_expected", [
    ("quick", _bare_figure, True),
    ("cell", _bare_figure, True),
    ("thesis", _bare_figure, False),
    ("quick", lambda: _own_red_note(_bare_figure()), False),  # it says so already
    ("quick", lambda: _shows_the_full_run(_bare_figure()), False),
])
def test_save_figure_stamps_every_figure_of_a_reduced_preset(preset, make, stamp_expected,
                                                            tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from mrilib.plots import PRESET_STAMPS, save_figure

    monkeypatch.setenv("MRILIB_PRESET", preset)
    fig = make()
    before = len(fig.texts)
    path = save_figure(fig, "stamped", directory=tmp_path)
    texts = [t.get_text().replace("\n", " ") for t in fig.texts]
    assert (PRESET_STAMPS.get(preset) in texts) == stamp_expected
    assert len(texts) == before + stamp_expected
    save_figure(fig, "again", directory=tmp_path)
    assert len(fig.texts) == len(texts)  # once per figure, however often it is saved
    assert path.stat().st_size > 1000
    plt.close(fig)

"""Every figure of the project, one module per chapter; each function returns the Figure.

Given ``save=NAME`` a function also writes ``NAME.png`` with :func:`save_figure` under
:func:`mrilib.paths.figures_dir` (``figures/`` for the full protocol, ``cache/quick/``
for quick runs, so tests never overwrite the committed figures). The chapter 3 and 7
figures are imported on first use (they pull in pytorch-grad-cam and the statistics).
Chapter 7's tables, whose numbers its figures draw, are in :mod:`mrilib.report`.

A figure made under a reduced preset (``quick``, ``cell``) says so in red
(:func:`stamp`): :func:`save_figure` stamps every figure that does not already carry a
red note of its own, so no quick figure reaches a slide unlabelled.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

from .._lazy import lazy_names
from ..paths import atomic_write_bytes, figures_dir, preset_name

NOTE_COLOR = "firebrick"  # the red of every note that says what made a figure
PRESET_STAMPS = {
    "quick": ("quick preset: anything trained for this figure (classifiers, generators) is "
              "tiny and trained briefly; it shows the method, not the thesis's finding"),
    "cell": ("cell preset: one cell of the grid with short training; it tests the code, not "
             "the thesis's finding"),
}
_PRESET = object()  # stamp()'s default: the stamp of the preset in force


def stamp(fig, note=_PRESET):
    """Write ``note`` in red above ``fig``, once per figure, and return ``fig``.

    By default the note is the stamp of the preset in force (:data:`PRESET_STAMPS`;
    nothing under ``thesis``). ``note=None`` says the figure shows nothing a reduced
    preset made (e.g. committed results of the full run), so it is left unstamped.
    A figure already stamped, or carrying a red note of its own, is left as it is.
    """
    if getattr(fig, "mrilib_stamped", False) or _has_red_note(fig):
        return fig
    if note is _PRESET:
        note = PRESET_STAMPS.get(preset_name())
    fig.mrilib_stamped = True
    if note:
        width = int(fig.get_size_inches()[0] * 144 / 8)  # ~0.5 em per character at 8 pt
        fig.text(0.01, 1.0, "\n".join(textwrap.wrap(note, width)), fontsize=8, ha="left",
                 va="bottom", color=NOTE_COLOR)
    return fig


def _has_red_note(fig) -> bool:
    from matplotlib.colors import same_color

    return any(same_color(t.get_color(), NOTE_COLOR) for t in fig.texts)


def save_figure(fig, name: str, dpi: int = 150, directory=None) -> Path:
    """Write ``fig`` as ``<directory>/<name>.png`` atomically (default :func:`figures_dir`);
    return the path. Under a reduced preset an unstamped figure is stamped first."""
    stamp(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    folder = figures_dir() if directory is None else Path(directory)
    return atomic_write_bytes(folder / f"{Path(name).stem}.png", buf.getvalue())


from .data import (class_counts_figure, class_counts_table,  # noqa: E402
                   example_grid_figure, intensity_histogram_figure,
                   nearest_neighbour_figure)
from .synthetic import (class_fidelity_figure, memorization_figure,  # noqa: E402
                        strength_sweep_figure, variations_figure)

_LAZY = {
    "cam": ["real_vs_synthetic_cam_figure", "cam_agreement_figure", "scan_cam_figure"],
    "results": ["loss_curves_figure", "augmentation_figure", "thesis_comparison_figure",
                "fraction_sweep_figure", "synthetic_effect_figure", "leakage_figure",
                "if_available", "MissingCells"],
    "training": ["LiveLossPlot", "training_set_figure", "replicates_table"],
}
__getattr__, _LAZY_NAMES = lazy_names(__name__, _LAZY, globals())

__all__ = sorted(["save_figure", "stamp", "NOTE_COLOR", "PRESET_STAMPS",
                  "class_counts_figure", "class_counts_table",
                  "example_grid_figure", "intensity_histogram_figure",
                  "nearest_neighbour_figure", "class_fidelity_figure", "memorization_figure",
                  "strength_sweep_figure", "variations_figure", *_LAZY_NAMES])

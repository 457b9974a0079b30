"""Every figure of the project, one module per chapter; each function returns the Figure.

Given ``save=NAME`` a function also writes ``NAME.png`` with :func:`save_figure` under
:func:`mrilib.paths.figures_dir` (``figures/`` for the full protocol, ``cache/quick/``
for quick runs, so tests never overwrite the committed figures). The chapter 3 and 7
figures are imported on first use (they pull in pytorch-grad-cam and the statistics).
Chapter 7's tables, whose numbers its figures draw, are in :mod:`mrilib.report`.
"""
from __future__ import annotations

import io
from pathlib import Path

from .._lazy import lazy_names
from ..paths import atomic_write_bytes, figures_dir


def save_figure(fig, name: str, dpi: int = 150, directory=None) -> Path:
    """Write ``fig`` as ``<directory>/<name>.png`` atomically (default :func:`figures_dir`);
    return the path."""
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

__all__ = sorted(["save_figure", "class_counts_figure", "class_counts_table",
                  "example_grid_figure", "intensity_histogram_figure",
                  "nearest_neighbour_figure", "class_fidelity_figure", "memorization_figure",
                  "strength_sweep_figure", "variations_figure", *_LAZY_NAMES])

"""Every figure of the project, one module per chapter; each function returns the Figure.

Given ``save=NAME`` a function also writes ``NAME.png`` with :func:`save_figure` under
:func:`mrilib.paths.figures_dir` (``figures/`` for the full protocol, ``cache/quick/``
for quick runs, so tests never overwrite the committed figures).
"""
from __future__ import annotations

import io
from pathlib import Path

from ..paths import atomic_write_bytes, figures_dir


def save_figure(fig, name: str, dpi: int = 150) -> Path:
    """Write ``fig`` as ``<figures_dir>/<name>.png`` atomically; return the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(figures_dir() / f"{Path(name).stem}.png", buf.getvalue())


from .data import (class_counts_figure, class_counts_table,  # noqa: E402
                   example_grid_figure, intensity_histogram_figure,
                   nearest_neighbour_figure)

__all__ = ["save_figure", "class_counts_figure", "class_counts_table", "example_grid_figure",
           "intensity_histogram_figure", "nearest_neighbour_figure"]

"""Chapter 7's report: its tables (:mod:`.tables`) and ``summary.md`` (:mod:`.summary`).

The figures are drawn by :mod:`mrilib.plots.results`; ``python -m mrilib report`` runs
:func:`write_report`.
"""
from __future__ import annotations

from .summary import (by_split, figure_makers, markdown_table, moderate_note, splits_of,
                      summary_markdown, write_report)
from .tables import (TABLE_ROWS, THESIS_NUMBERS, THESIS_PAIRS, cell_estimate, cell_interval,
                     cells_table, classification_table, effects_table, format_interval,
                     leak_free_effects, leakage_table, min_clusters, results_table,
                     thesis_comparison, thesis_differences, thesis_metric, verdict)

__all__ = ["TABLE_ROWS", "THESIS_NUMBERS", "THESIS_PAIRS", "by_split", "cell_estimate",
           "cell_interval", "splits_of",
           "cells_table", "classification_table", "effects_table", "figure_makers",
           "format_interval", "leak_free_effects", "leakage_table", "markdown_table",
           "min_clusters", "moderate_note", "results_table", "summary_markdown",
           "thesis_comparison", "thesis_differences", "thesis_metric", "verdict",
           "write_report"]

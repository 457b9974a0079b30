"""Thesis chapter 7 as one declarative grid, and a resumable runner for it.

:func:`grid_cells` lists the cells of a preset (:mod:`.cells`), :func:`run_grid` trains
every repeat of every cell and streams one row per run into ``runs.jsonl`` and one per
epoch into ``epochs.jsonl`` (:mod:`.runner`, :mod:`.store`), :func:`load_results` reads
them back with one design per model (:mod:`.load`), and :func:`chapter_results` is the
one rule for which runs chapter 7 shows (:mod:`.chapter`). Pacing for time-limited GPU
jobs lives apart, in :mod:`.schedule`.

Sampling design (what makes comparisons between cells paired):

* ``G`` (``samples``: 5, quick 2) stratified real samples per fraction; sample ``g`` is
  drawn from the training pool with seed ``g``. Repeat ``r`` of **every** cell uses
  sample ``g = r mod G``, so two cells at one fraction share their real images repeat by
  repeat; training seed ``t_r`` and variation seed ``u_r`` are the repeat's own.
* Generator ``g`` learns from sample ``g`` at the grid's smallest fraction (30%,
  ``generator_fraction``) and serves every synthetic cell of repeat ``r = g mod G``. That
  is leak-free at every fraction because samples of one seed are nested (the 30% sample
  lies inside the 40% one, ...; :func:`mrilib.splits.check_nested` verifies it before a
  grid trains, and mixing checks each generator's recorded training ids). It mirrors the
  thesis's one fixed DALL-E 2 and trains G generators instead of G per fraction.
* Repeats sharing ``g`` are clustered: :mod:`mrilib.stats` resamples samples, then repeats.

Each run has a stable key (:mod:`.design`), so an interrupted or time-boxed run resumes
with no lost or duplicated rows.
"""
from .cells import (AUGS, FRACTIONS, LEAKAGE, MODELS, SPLITS, SYNTHETIC, Cell, cell_tiers,
                    grid_cells, make_cell)
from .chapter import (ChapterResults, chapter_results, committed_results_dir, folder_line,
                      needs_grid, preset_note)
from .design import (RepeatSeeds, cell_design, design_hash, generator_hash, grid_settings,
                     repeat_seeds, run_key, train_overrides)
from .load import MixedDesignsWarning, export_csv, load_results
from .runner import GridProgress, Unpaced, grid_results_dir, grid_status, run_grid
from .sets import (GeneratorNeed, TrainingSets, class_share_losses, generator_fraction,
                   generator_needs, grid_data, training_sets)
from .store import EPOCHS_FILE, RUNS_FILE, ResultsWriter, epoch_rows, merge_results, run_row

__all__ = [
    "AUGS", "FRACTIONS", "LEAKAGE", "MODELS", "SPLITS", "SYNTHETIC", "Cell", "ChapterResults",
    "cell_tiers", "class_share_losses",
    "EPOCHS_FILE", "GeneratorNeed", "GridProgress", "MixedDesignsWarning", "RUNS_FILE",
    "RepeatSeeds", "ResultsWriter", "TrainingSets", "Unpaced", "cell_design",
    "chapter_results", "committed_results_dir", "design_hash", "epoch_rows", "export_csv",
    "folder_line", "generator_fraction", "generator_hash", "generator_needs", "grid_cells",
    "grid_data", "grid_results_dir", "grid_settings", "grid_status", "load_results",
    "make_cell", "merge_results", "needs_grid", "preset_note", "repeat_seeds", "run_grid",
    "run_key", "run_row", "train_overrides", "training_sets",
]

"""The runs chapter 7 reads, by one rule for notebooks, ``report`` and ``make reproduce``,
and the line that says where they came from."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .. import paths
from ..config import settings
from .cells import DEFAULTS, MODELS, PRESETS, grid_cells
from .load import load_results, shown
from .runner import grid_status, run_grid
from .store import RUNS_FILE, read_runs


TRAIN_ON_DEMAND = ("quick",)  # presets whose grid chapter_results trains itself: CPU minutes


@dataclass
class ChapterResults:
    """The runs chapter 7 is drawn from, and a line that says where they came from."""

    runs: object          # pandas DataFrame, one row per training run (load_results)
    epochs: object        # pandas DataFrame, one row per run and epoch
    directory: Path       # the folder holding their runs.jsonl
    description: str      # committed full run, or a small CPU grid whose numbers mean nothing
    committed: bool       # True when read from the repository's results/
    note: str | None      # for figures: what the numbers are not (None for the full protocol)


def committed_results_dir() -> Path:
    """``results/`` of the repository: the committed rows of the full (thesis) GPU run."""
    return paths.ROOT / "results"


def chapter_results(preset: str | None = None, train: bool = True, progress: bool = True,
                    results=None, **grid_kwargs) -> ChapterResults:
    """The runs chapter 7 reads, by one rule for notebooks, ``report`` and ``make reproduce``.

    A preset reads its own results: ``thesis`` the committed ``results/`` (the full GPU
    run), ``quick`` and ``cell`` their folder under ``cache/<preset>/``. In a preset of
    :data:`TRAIN_ON_DEMAND` (quick) a missing or partial grid is run or resumed first
    (:func:`run_grid` with ``grid_kwargs``); ``train=False`` only reads. ``results`` (or
    the ``MRILIB_RESULTS`` environment variable) names another folder to read instead,
    e.g. ``results`` to show the committed full run under the quick preset; nothing is
    trained for it. A folder without runs raises FileNotFoundError naming the commands
    that make them. The folder is read by :func:`load_results`, one design per (preset,
    model); ``description`` says what was set aside.
    """
    preset = preset or paths.preset_name()
    results = results or os.environ.get("MRILIB_RESULTS") or None
    with paths.preset_env(preset):
        own = committed_results_dir() if preset == "thesis" else paths.results_dir()
    directory = own if results is None else Path(results)
    if results is None and train and preset in TRAIN_ON_DEMAND:
        run_grid(preset, train_generators=True, resume=True, progress=progress, **grid_kwargs)
    if not _run_count(directory):
        raise FileNotFoundError(_no_runs_message(directory, preset))
    runs, epochs = load_results(directory)
    committed = directory.resolve() == committed_results_dir().resolve()
    line = (_committed_line(runs, preset) if committed
            else _local_line(runs, preset, directory) if directory == own
            else folder_line(runs, directory))
    return ChapterResults(runs, epochs, directory, _with_set_aside(line, runs), committed,
                          preset_note(runs))


def _no_runs_message(directory: Path, preset: str) -> str:
    if directory.resolve() == committed_results_dir().resolve():
        return (f"{shown(directory)}/ holds no runs of the current protocol yet (the full "
                f"GPU grid has not been run and committed; the first protocol's runs are in "
                f"results/archive/). On a GPU run `python -m mrilib grid --preset {preset} "
                f"--train-generators --resume` (again after any interruption; --tier 1 runs "
                f"the basic CNN's cells first) and rerun; or see the chapter on a small CPU "
                f"grid with MRILIB_PRESET=quick (numbers test the code only)")
    return (f"{shown(directory)}/ holds no runs; make them with `python -m mrilib grid "
            f"--preset {preset} --resume`, or point MRILIB_RESULTS (or --results) at a "
            f"folder that holds runs.jsonl")


def _with_set_aside(line: str, runs) -> str:
    """``line`` plus what :func:`load_results` set aside to keep one design per model."""
    aside = runs.attrs.get("set_aside")
    return line if not aside else f"{line} {aside['short']}"


def needs_grid(preset: str | None = None) -> bool:
    """Whether ``preset``'s own results lack runs of its grid under the current protocol
    (counted by run key, as ``grid --resume`` counts them: runs of an older design do not
    count, and a partial grid is resumed)."""
    preset = preset or paths.preset_name()
    with paths.preset_env(preset):
        own = committed_results_dir() if preset == "thesis" else paths.results_dir()
    status = grid_status(preset, own)
    return bool((status["done"] < status["repeats"]).any())


def preset_note(runs) -> str | None:
    """What runs of a reduced preset are not (a line for figures); None for the thesis's."""
    presets = sorted({str(p) for p in runs["preset"].dropna()}) if "preset" in runs else []
    if not presets or presets == ["thesis"]:
        return None
    return (f"{'/'.join(presets)} preset: models of {_epochs_of(runs)} epoch(s) on "
            f"{_values(runs, 'n_images')} of the 6,400 slices; the numbers test the code only.")


def _run_count(directory: Path) -> int:
    return len(read_runs(directory))


def _complete_cells(rows: Iterable[dict], preset: str, **overrides) -> tuple[int, int]:
    """(cells of ``preset``'s grid with all repeats, cells with any) among ``rows``, by cell key."""
    from collections import Counter

    counts = Counter(r["cell_key"] for r in rows)
    repeats = settings(DEFAULTS, PRESETS, preset)["repeats"]
    keys = [c.key for c in grid_cells(preset, **overrides)]
    return sum(counts[k] >= repeats for k in keys), sum(counts[k] > 0 for k in keys)


def _values(runs, column: str) -> str:
    if column not in runs:
        return "unknown"
    return ", ".join(sorted({str(v) for v in runs[column].dropna()})) or "unknown"


def _epochs_of(runs) -> str:
    settings_ = runs["train_settings"] if "train_settings" in runs else []
    settings_ = [s for s in settings_ if isinstance(s, dict) and "epochs" in s]
    epochs = "/".join(map(str, sorted({int(s["epochs"]) for s in settings_}))) or "?"
    # with early stopping the epochs are a most, not what each run trained
    stopping = any(s.get("patience") and s["patience"] < s["epochs"] for s in settings_)
    return f"up to {epochs}" if stopping else epochs


def _committed_line(runs, preset: str) -> str:
    complete, started = _complete_cells(runs.to_dict("records"), "thesis")
    total = len(grid_cells("thesis"))
    state = ("complete" if complete == total
             else f"partial: {complete} of {total} cells complete, {started} started")
    commits = ", ".join(c[:10] for c in _values(runs, "git_commit").split(", "))
    where = ("" if preset == "thesis" else f"; read under the {preset} preset, figures go to "
             f"{shown(paths.CACHE / preset / 'figures')}/")
    return (f"Committed full run ({shown(committed_results_dir())}/, {state}): {len(runs)} "
            f"runs on {_values(runs, 'device_name')}, commit {commits}{where}.")


def folder_line(runs, directory: Path) -> str:
    """What a results folder named explicitly holds of its grid: a report's first line."""
    presets = sorted({str(p) for p in runs["preset"].dropna()}) if "preset" in runs else []
    line = f"Runs read from {shown(directory)}/: {len(runs)} runs"
    models = [m for m in MODELS if "model" in runs and (runs["model"] == m).any()]
    if _superseded(runs):
        designs = ", ".join(sorted({str(d) for d in runs["design"].dropna()}))
        return _with_set_aside(f"{line} of a protocol this code no longer trains (design "
                               f"{designs}): read as they are, not as cells of today's grid.",
                               runs)
    if len(presets) == 1 and models:
        try:
            complete, started = _complete_cells(runs.to_dict("records"), presets[0],
                                                models=models)
            line += (f", {complete} of {len(grid_cells(presets[0], models=models))} cells of "
                     f"the {presets[0]} grid's {', '.join(models)} complete, {started} started")
        except (KeyError, ValueError):  # a preset this code no longer has
            pass
    return _with_set_aside(line + ".", runs)


def _superseded(runs) -> bool:
    """Whether no row has the design today's code gives its (preset, model): an archive."""
    from .load import current_design

    if "design" not in runs or "preset" not in runs:
        return False
    pairs = runs[["preset", "model", "design"]].drop_duplicates().itertuples(index=False)
    return not any(current_design(p, m) == d for p, m, d in pairs)


def _local_line(runs, preset: str, directory: Path) -> str:
    complete, _ = _complete_cells(runs.to_dict("records"), preset)
    kind = "Quick CPU grid" if preset == "quick" else f"The {preset!r} preset's grid"
    line = (f"{kind} ({shown(directory)}/): {len(runs)} runs, {complete} of "
            f"{len(grid_cells(preset))} cells complete, {_epochs_of(runs)} epoch(s) on "
            f"{_values(runs, 'n_images')} of the 6,400 slices")
    return line + (": numbers test the code only, not the thesis." if preset == "quick" else ".")

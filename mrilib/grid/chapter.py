"""The runs chapter 7 reads, by one rule for notebooks, ``report`` and ``make reproduce``,
and the line that says where they came from."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .. import paths
from ..config import settings
from .cells import DEFAULTS, MODELS, PRESETS, grid_cells
from .load import load_results, shown
from .runner import grid_status, run_grid
from .store import RUNS_FILE, read_jsonl


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
                    **grid_kwargs) -> ChapterResults:
    """The runs chapter 7 reads, by one rule for notebooks, ``report`` and ``make reproduce``.

    1. The committed ``results/`` holds runs: use them, whatever the preset (reading them
       takes seconds; figures still go to the preset's :func:`mrilib.paths.figures_dir`).
    2. Otherwise, in a preset of :data:`TRAIN_ON_DEMAND` (quick), run or resume that
       preset's grid with its generators (:func:`run_grid`, ``grid_kwargs`` passed on)
       into ``cache/<preset>/results`` and use it; ``train=False`` only reads it.
    3. Otherwise use the preset's own results folder if it holds runs (e.g. ``cell``),
       else raise FileNotFoundError with the commands that make them.

    Either folder is read by :func:`load_results`, one design per (preset, model): runs
    of a superseded design are set aside (with a :class:`MixedDesignsWarning`), and
    ``description`` says how many.
    """
    preset = preset or paths.preset_name()
    committed = committed_results_dir()
    if _run_count(committed):
        runs, epochs = load_results(committed)
        return ChapterResults(runs, epochs, committed,
                              _with_set_aside(_committed_line(runs, preset), runs), True,
                              preset_note(runs))
    with paths.preset_env(preset):
        directory = paths.results_dir()
    if train and preset in TRAIN_ON_DEMAND:
        run_grid(preset, train_generators=True, resume=True, progress=progress, **grid_kwargs)
    if not _run_count(directory):
        also = "" if directory == committed else \
            f", nor does {shown(directory)}/ for the {preset!r} preset"
        raise FileNotFoundError(
            f"{shown(committed)}/ holds no runs yet (the full GPU grid has not been run and "
            f"committed){also}. On a GPU run "
            f"`python -m mrilib grid --preset {preset} --train-generators --resume` (again "
            f"after any interruption; --max-minutes M time-boxes a chunk) and rerun; or see "
            f"the chapter on a small CPU grid with MRILIB_PRESET=quick (numbers test the "
            f"code only)")
    runs, epochs = load_results(directory)
    return ChapterResults(runs, epochs, directory,
                          _with_set_aside(_local_line(runs, preset, directory), runs), False,
                          preset_note(runs))


def _with_set_aside(line: str, runs) -> str:
    """``line`` plus what :func:`load_results` set aside to keep one design per model."""
    aside = runs.attrs.get("set_aside")
    return line if not aside else f"{line} {aside['short']}"


def needs_grid(preset: str | None = None) -> bool:
    """Whether ``make reproduce`` must train ``preset``'s grid before the notebooks.

    Not when :func:`chapter_results` would read the committed ``results/`` anyway: in
    the thesis preset once they hold every run of the grid under the current training
    protocol (counted by run key, as ``grid --resume`` counts them, so runs of an older
    design do not count; a partial committed run is resumed), in the other presets once
    they hold any runs.
    """
    preset = preset or paths.preset_name()
    if preset != "thesis":
        return not read_jsonl(committed_results_dir() / RUNS_FILE)[0]
    status = grid_status("thesis", committed_results_dir())
    return bool((status["done"] < status["repeats"]).any())


def preset_note(runs) -> str | None:
    """What runs of a reduced preset are not (a line for figures); None for the thesis's."""
    presets = sorted({str(p) for p in runs["preset"].dropna()}) if "preset" in runs else []
    if not presets or presets == ["thesis"]:
        return None
    return (f"{'/'.join(presets)} preset: {_epochs_of(runs)}-epoch models on "
            f"{_values(runs, 'n_images')} of the 6,400 slices; the numbers test the code only.")


def _run_count(directory: Path) -> int:
    return len(read_jsonl(Path(directory) / RUNS_FILE)[0])


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
    epochs = sorted({int(s["epochs"]) for s in settings_ if isinstance(s, dict) and "epochs" in s})
    return "/".join(map(str, epochs)) or "?"


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

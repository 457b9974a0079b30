"""Reading results back: one training protocol and one generator per model and preset.

A folder can hold runs of several designs (:mod:`mrilib.grid.design`), e.g. after a
default changed and ``grid --resume`` retrained under the new one. Medians must not mix
two protocols, so :func:`load_results` keeps one design per (preset, model) and says what
it set aside.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

from .. import paths
from .design import design_hash, generator_hash, grid_settings
from .store import RUNS_FILE, data_fingerprints, read_epochs, read_runs, shard_folders


class MixedDesignsWarning(UserWarning):
    """A results folder holds runs of several designs; :func:`load_results` set some aside."""


def load_results(directory: str | os.PathLike | None = None, design: str | None = "current"):
    """``(runs, epochs)`` DataFrames from a results folder (default: :func:`results_dir`).

    ``runs`` has one row per training run, ``epochs`` one per run and epoch; both carry
    the cell columns, so ``runs.groupby(list(mrilib.stats.CELL_COLUMNS))`` gives cells.

    A folder can hold runs of several designs (:func:`design_hash`: the training protocol
    and grid settings a run was trained under), e.g. after a default changed and
    ``grid --resume`` retrained under the new one. Medians over repeats must not mix two
    protocols, so by default (``design="current"``) one design is kept per (preset,
    model), the granularity at which :func:`design_hash` is defined:

    1. the design the current code computes for that preset's own settings
       (``design_hash(grid_settings(preset), preset, model)``, what ``grid --resume`` and
       :func:`grid_status` count as done) when the folder holds rows of it: the rule for
       the committed full run and the presets' grids; else
    2. the design of the (preset, model)'s most recently written row: rows made with
       explicit settings (``train={...}``, ``seeds=...``, ``samples=...`` passed to
       :func:`run_grid`; ``cells=``/``repeats=`` do not change the design) or under older
       defaults that no current run replaces. A folder of one design per (preset, model)
       is read whole; the newest experiment wins over older ones, whatever their size.

    The same rule then keeps one generator (``generator_design``, :func:`cell_design`)
    among the synthetic rows of each (preset, model): a synthetic median never mixes
    images of two generator recipes, and every synthetic row kept shares its training
    protocol with the real-only rows it is compared with.

    Rows set aside are reported with a :class:`MixedDesignsWarning` (folder, count, the
    designs kept and set aside) and in ``runs.attrs["set_aside"]`` (None when nothing
    was). ``design=None`` keeps every row; ``design="a1b2c3d4"`` keeps that one training
    design (one generator chosen as above), ``"a1b2c3d4+e5f6a7b8"`` that design's
    real-only runs and its synthetic runs of that generator (``+unrecorded``: synthetic
    rows written before rows named their generator); a ValueError lists the folder's
    designs when it holds none of it. ``epochs``
    always holds the epochs of the runs kept.

    Each run counts once: identical copies of a row fold, two different rows of one run
    key raise (:func:`mrilib.grid.store.read_runs`). Unless ``design=None``, runs made
    from two data sets (two ``data_fingerprint``) raise too: no median may pool them.
    """
    import pandas as pd

    directory = Path(directory) if directory is not None else paths.results_dir()
    runs_path = directory / RUNS_FILE
    if not (runs_path.exists() or shard_folders(directory)):  # cluster jobs' rows, unmerged
        raise FileNotFoundError(f"no results at {runs_path}; run the grid first "
                                f"(python -m mrilib grid --preset ...) or point at the "
                                f"folder that holds {RUNS_FILE}")
    runs = [_current_names(r) for r in read_runs(directory)]
    runs, aside = _one_design(runs, design, directory)
    if design is not None:
        _check_one_data_set(runs, directory)
    epochs = [_current_names(e) for e in read_epochs(directory, {r["run_key"] for r in runs})]
    if aside is not None:
        warnings.warn(aside["message"], MixedDesignsWarning, stacklevel=2)
    runs = pd.DataFrame(runs)
    runs.attrs["set_aside"] = aside
    return runs, pd.DataFrame(epochs)


def _check_one_data_set(rows: list[dict], directory: Path) -> None:
    """Refuse to pool runs made from two data sets (two ``--source`` or ``MRILIB_DATA``)."""
    held = data_fingerprints(rows)
    if len(held) > 1:
        listed = ", ".join(f"{fp} ({n} runs)" for fp, n in held.most_common())
        raise ValueError(f"{shown(directory)}/{RUNS_FILE} holds runs made from "
                         f"{len(held)} data sets (data_fingerprint {listed}); no table may "
                         f"pool them. Move one data set's rows to another folder, or read "
                         f"them all with load_results(..., design=None)")


def _current_names(row: dict) -> dict:
    """``row`` with today's columns: rows written before 2026-12 named a cell's leakage
    mode ``generator`` and had no ``split`` (they were all slice-level)."""
    if "generator" in row and "leakage" not in row:
        row["leakage"] = row.pop("generator")
    row.setdefault("split", "slice")
    return row


def _one_design(rows: list[dict], design: str | None, directory: Path
                ) -> tuple[list[dict], dict | None]:
    """``rows`` of the design(s) :func:`load_results` keeps, and what was set aside.

    Two choices, each per (preset, model): the training design (``design``), then, among
    the synthetic rows kept, the generator (``generator_design``), so that real-only and
    synthetic cells compared with each other share one training protocol.
    """
    if design is None or not rows:
        return rows, None
    if design != "current":
        held = Counter(r.get("design") for r in rows)
        held.update(_full_design(r) for r in rows if _generator_of(r) is not None)
        if design not in held:
            listed = ", ".join(f"{d} ({n} runs)" for d, n in held.items())
            raise ValueError(f"{shown(directory)}/{RUNS_FILE} holds no runs of design "
                             f"{design!r}; it holds {listed}. Pass one of those, "
                             f"design='current' or design=None (every row)")
        training, _, generator = design.partition("+")
        rows = [r for r in rows if r.get("design") == training]
        if generator:  # that generator's synthetic runs, with the real-only runs beside them
            return [r for r in rows if _generator_of(r) in (None, generator)], None
        keep, parts = [True] * len(rows), []
    else:
        keep, parts = _choose(rows, lambda r: r.get("design"), current_design, "design")
    trained = [r for r, k in zip(rows, keep) if k]
    synthetic = [r for r in trained if _generator_of(r) is not None]
    keep_gen, gen_parts = _choose(synthetic, _generator_of,
                                  lambda preset, model: _current_generator(preset),
                                  "generator")
    other_generator = {id(r) for r, k in zip(synthetic, keep_gen) if not k}
    kept = [r for r in trained if id(r) not in other_generator]
    if len(kept) == len(rows):
        return rows, None
    dropped = [r for r, k in zip(rows, keep) if not k]  # another training design
    set_aside = Counter(r.get("design") for r in dropped)
    set_aside.update(_full_design(r) for r in synthetic if id(r) in other_generator)
    folder = shown(directory)
    example = next(iter(set_aside))
    n_dropped = len(rows) - len(kept)
    message = (f"{folder}/{RUNS_FILE}: {n_dropped} of {len(rows)} runs set aside so that "
               f"no cell mixes two training protocols or two generators; "
               + "; ".join(parts + gen_parts) + ". Read them anyway with "
               f"load_results({folder!r}, design=None) (every row) or design={example!r} "
               f"(one design).")
    short = (f"{n_dropped} runs of another design ("
             + ", ".join(str(d) for d in set_aside) + ") set aside; "
             "load_results(..., design=None) reads them.")
    return kept, {"dropped": n_dropped, "kept": sorted({str(_full_design(r)) for r in kept}),
                  "set_aside": {str(d): n for d, n in set_aside.items()},
                  "message": message, "short": short}


def _choose(rows: list[dict], value: Callable[[dict], str], current: Callable, what: str
            ) -> tuple[list[bool], list[str]]:
    """Which ``rows`` keep the one ``value`` chosen per (preset, model), and why (text).

    The value the current code gives the group (``current(preset, model)``) where the
    group holds rows of it, else the value of its most recently written row.
    """
    groups: dict[tuple, list] = {}
    for r in rows:  # file order is the order the runs were written in
        groups.setdefault((r.get("preset"), r.get("model")), []).append(value(r))
    chosen, parts = {}, []
    for (preset, model), values in groups.items():
        now = current(preset, model) if len(set(values)) > 1 else None
        chosen[preset, model] = now if now in values else values[-1]
        others = Counter(v for v in values if v != chosen[preset, model])
        if others:
            why = "the current code's" if now in values else "the newest"
            parts.append(f"{model} ({preset} preset): kept {what} {chosen[preset, model]} "
                         f"({why}, {values.count(chosen[preset, model])} runs), set aside "
                         + ", ".join(f"{d} ({n} runs)" for d, n in others.items()))
    return [value(r) == chosen[r.get("preset"), r.get("model")] for r in rows], parts


def _generator_of(row: dict) -> str | None:
    """A synthetic row's generator design; ``"unrecorded"`` for rows written before run
    keys carried it (their images came from some earlier recipe); None for real-only rows."""
    if row.get("synthetic", "none") == "none":
        return None
    return row.get("generator_design") or "unrecorded"


def _full_design(row: dict) -> str:
    """A row's design with its generator's (:func:`cell_design`'s form)."""
    generator = _generator_of(row)
    return row.get("design") if generator is None else f"{row.get('design')}+{generator}"


def current_design(preset, model) -> str | None:
    """The design the current code gives ``model``'s runs under ``preset``'s own settings."""
    if preset is None or model is None:
        return None
    try:
        cfg = grid_settings(preset)
        with paths.preset_env(preset):
            return design_hash(cfg, preset, model)
    except (ValueError, TypeError, KeyError):  # a preset or model this code no longer has
        return None


def _current_generator(preset) -> str | None:
    """The generator design the current code gives ``preset``'s synthetic cells."""
    if preset is None:
        return None
    try:
        cfg = grid_settings(preset)
        with paths.preset_env(preset):
            return generator_hash(cfg)
    except (ValueError, TypeError, KeyError):
        return None


def export_csv(directory: str | os.PathLike | None = None) -> list[Path]:
    """``runs.csv`` and ``epochs.csv`` beside the JSONL files (nested values as JSON)."""
    directory = Path(directory) if directory is not None else paths.results_dir()
    runs, epochs = load_results(directory, design=None)  # a faithful copy: every design
    written = []
    for name, frame in (("runs.csv", runs), ("epochs.csv", epochs)):
        flat = frame.copy()
        for col in flat.columns:
            if flat[col].map(lambda v: isinstance(v, (list, dict))).any():
                flat[col] = flat[col].map(json.dumps)
        written.append(paths.atomic_write_bytes(directory / name,
                                                flat.to_csv(index=False).encode()))
    return written


def shown(directory: Path) -> str:
    """``directory`` relative to the repository where it lies inside it."""
    directory = Path(directory).resolve()
    root = paths.ROOT.resolve()
    return str(directory.relative_to(root)) if directory.is_relative_to(root) else str(directory)

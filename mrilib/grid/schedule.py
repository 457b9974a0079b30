"""Pacing the grid for time-limited GPU jobs: skip a cell that would not finish in time.

``grid --max-minutes M`` (a remote GPU job that may run one command for a fixed time)
passes :func:`time_budget` to :func:`mrilib.grid.run_grid`. It judges each cell by the
last cell of its model (from the results folder, then this chunk), scaled up by its
repeats' vmap groups and its training set's size; a model with no cell yet by this card's
committed benchmark. A rerun with ``--resume`` continues where the chunk stopped.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

from .. import paths
from .cells import MODELS, Cell
from .design import grid_settings, train_overrides
from .runner import grid_results_dir
from .store import read_runs


def time_budget(max_minutes: float, preset: str | None = None, results_path=None,
                device=None, clock: Callable[[], float] = time.monotonic,
                benchmarks: bool = True, **overrides) -> "TimeBudget":
    """A pacer for :func:`mrilib.grid.run_grid` that keeps a chunk inside ``max_minutes``.

    It learns from the runs already in the grid's results folder; ``benchmarks=False``
    ignores this card's benchmarks and vmap group sizes (for a stand-in trainer).
    """
    preset = preset or paths.preset_name()
    cfg = grid_settings(preset, **overrides)
    with paths.preset_env(preset):
        history = read_runs(grid_results_dir(cfg, results_path))
        priors, groups = ({}, lambda model: 1)
        if benchmarks:
            priors, groups = _priors(cfg, device), _group_sizes(cfg, device)
    return TimeBudget(max_minutes, clock, history, groups, priors)


class TimeBudget:
    """Judges before each cell whether it would finish inside ``max_minutes``.

    A cell's time is the last cell of its model's, scaled up (never down) by vmap groups
    (``group_size(model)`` replicates train at once) and training-set size: an
    over-estimate leaves a little time unused, an under-estimate loses the whole cell to
    the job's hard stop. A model with no cell yet is judged by ``priors``
    (:func:`bench_priors`), else not at all; once a cell has been skipped, a cell whose
    time cannot be judged is skipped too (little time is left).
    """

    skipped = False  # whether a cell has been skipped for time

    def __init__(self, max_minutes: float | None, clock: Callable[[], float], history: list[dict],
                 group_size: Callable[[str], int] = lambda model: 1,
                 priors: dict[str, dict] | None = None):
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"max_minutes={max_minutes}: give a positive number of minutes")
        self.limit = None if max_minutes is None else 60.0 * max_minutes
        self.clock, self.start, self.group_size = clock, clock(), group_size
        self.priors = priors or {}
        # Per model, the last cell call seen: its seconds, repeats and training-set size.
        # Rows of one call share cell_key and cell_seconds, and are written together.
        self.seen: dict[str, dict] = {}
        for row in history:
            if row.get("cell_seconds") is None:
                continue
            last = self.seen.get(row["model"])
            if last and (last["cell"], last["seconds"]) == (row.get("cell_key"),
                                                            float(row["cell_seconds"])):
                last["repeats"] += 1
            else:
                self.seen[row["model"]] = {
                    "cell": row.get("cell_key"), "seconds": float(row["cell_seconds"]),
                    "repeats": 1, "size": _set_size(row["real_fraction"],
                                                    row.get("synthetic_fraction"))}

    def expected(self, cell: Cell, repeats: int) -> float:
        """Seconds ``repeats`` repeats of ``cell`` are expected to take (0 if unknown)."""
        last = self.seen.get(cell.model) or self._prior(cell.model)
        if last is None:
            return 0.0
        size = _set_size(cell.real_fraction, cell.synthetic_fraction)
        group = max(1, int(self.group_size(cell.model)))
        groups = math.ceil(repeats / group) / math.ceil(last["repeats"] / group)
        return last["seconds"] * max(1.0, groups) * max(1.0, size / last["size"])

    def _prior(self, model: str) -> dict | None:
        """A benchmark as if it were a cell seen: one vmap group of its replicates."""
        p = self.priors.get(model)
        if p is None:
            return None
        return {"cell": None, "seconds": PRIOR_MARGIN * p["group_seconds"],
                "repeats": p["replicates"], "size": p["real_fraction"]}

    def fits(self, cell: Cell, repeats: int) -> bool:
        """Whether ``repeats`` of ``cell`` fit in what is left; a no is remembered."""
        if self.limit is None:
            return True
        expected = self.expected(cell, repeats)
        fits = self.clock() - self.start + expected <= self.limit and not (
            self.skipped and expected <= 0)
        self.skipped = self.skipped or not fits
        return fits

    def generator_minutes(self, cell: Cell, repeats: int) -> float | None:
        """Minutes left for generator training, keeping back the cell's own time."""
        if self.limit is None:
            return None
        left = self.limit - (self.clock() - self.start) - self.expected(cell, repeats)
        return max(left, 0.0) / 60.0

    def record(self, cell: Cell, seconds: float, repeats: int) -> None:
        self.seen[cell.model] = {"cell": cell.key, "seconds": seconds, "repeats": repeats,
                                 "size": _set_size(cell.real_fraction, cell.synthetic_fraction)}


PRIOR_MARGIN = 1.25  # a benchmark times no augmentation and no synthetic-set building


def bench_priors(device: str, cfg: dict, directory: str | os.PathLike | None = None
                 ) -> dict[str, dict]:
    """Per model, how long one vmap group took in this device's committed benchmarks.

    Read from ``benchmarks/bench-train-*.json`` (``python -m mrilib bench train``): rows
    of the default protocol on a device of this name (its 20 replicates in one group,
    128 px, no speed lever on), the slowest where several are, with their seconds
    scaled to the grid's epochs for the model (call it under :func:`preset_env`, as
    :func:`run_grid` does: the epochs are the preset's). Empty where none match (another
    card, a CPU).
    """
    from ..bench import DEFAULTS as BENCH_DEFAULTS
    from ..bench import saved_rows
    from ..train import model_settings

    directory = paths.ROOT / "benchmarks" if directory is None else Path(directory)
    priors: dict[str, dict] = {}
    for r in saved_rows(directory):
        if (r["device"] != device or r["img_size"] != 128 or r["levers"]
                or r["model"] not in MODELS or r["replicates"] != BENCH_DEFAULTS["replicates"]
                or not (r["seconds"] > 0 and 0 < r["real_fraction"] <= 1 and r["epochs"])):
            continue
        epochs = model_settings(r["model"], **train_overrides(cfg, r["model"]))["epochs"]
        seconds = r["seconds"] * epochs / r["epochs"]
        if seconds > priors.get(r["model"], {}).get("group_seconds", 0.0):
            priors[r["model"]] = {"group_seconds": seconds, "replicates": r["replicates"],
                                  "real_fraction": r["real_fraction"], "file": r["file"]}
    return priors


def _set_size(real_fraction: float, synthetic_fraction: float | None) -> float:
    """A training set's size as a fraction of the pool (real + synthetic), for timing."""
    return max(float(real_fraction) + float(synthetic_fraction or 0.0), 1e-6)


def _priors(cfg: dict, device) -> dict[str, dict]:
    """:func:`bench_priors` for the device the grid trains on (none for an unknown one)."""
    from ..device import device_name

    try:
        return bench_priors(device_name(device), cfg)
    except ValueError:  # no such device: the training reports it
        return {}


def _group_sizes(cfg: dict, device) -> Callable[[str], int]:
    """Replicates per vmap group of each model, as :func:`mrilib.train.train_replicates`
    forms them on ``device``."""
    def size(model: str) -> int:
        from ..device import resolve_device
        from ..train import group_size, model_settings

        return group_size(model_settings(model, **train_overrides(cfg, model))["max_parallel"],
                          resolve_device(device))
    return size
